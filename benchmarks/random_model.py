"""A randomly initialised GPT-2 of a chosen size, with a word-level tokenizer fitted to a text,
saved as a local model folder that ``--model`` loads offline.

    python benchmarks/random_model.py OUT                          # GPT-2 small's shape (12 x 768)
    python benchmarks/random_model.py OUT --layers 2 --width 64    # tiny, for a dry run

For throughput and memory benchmarks on a machine that has no model weights (the GPU machine has
neither a package registry nor the embedded model's package): a forward pass costs what it costs
for a trained model of the same shape; the activations are not a trained model's, so nothing here
says anything about SAE quality.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from jumprelu_ext.train.data.text import EMBEDDED_DATASET, iter_texts


def save_random_gpt2(folder: Path, dataset: str, layers: int, width: int, heads: int, context: int) -> Path:
    torch.manual_seed(0)
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(vocab_size=50257, special_tokens=["<unk>", "<pad>", "<bos>", "<eos>"])
    tokenizer.train_from_iterator(iter_texts(dataset), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    config = GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=heads,
        n_positions=context,
        vocab_size=len(fast),
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the model folder to write")
    parser.add_argument("--dataset", default=EMBEDDED_DATASET, help="the text the tokenizer is fitted to")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--context", type=int, default=1024, help="the longest window the model takes")
    args = parser.parse_args()
    save_random_gpt2(args.out, args.dataset, args.layers, args.width, args.heads, args.context)
    print(f"wrote a random {args.layers} x {args.width} GPT-2 to {args.out}")


if __name__ == "__main__":
    main()
