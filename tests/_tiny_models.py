"""Tiny randomly initialised models with locally built tokenizers: no downloads, fast forwards.

``save_tiny_gpt2`` / ``save_tiny_bert`` write a model folder that ``jumprelu_ext.train.data.harvest.load_model``
loads like any local checkpoint. Their vocabulary is the words of ``CORPUS``.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import BertConfig, BertModel, BertTokenizerFast, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

CORPUS = [
    "the quick brown fox jumps over the lazy dog . the dog sleeps in the sun .",
    "a sparse autoencoder learns a dictionary of features from model activations .",
    "each feature fires on a small set of tokens , and the threshold decides when it fires .",
    "python has lists , dicts and sets ; the standard library has many modules .",
    "tokens flow through the residual stream and every block adds its update to it .",
]
WORDS = sorted({w for doc in CORPUS for w in doc.split()})


def save_tiny_gpt2(folder: Path, n_positions: int = 64) -> Path:
    """GPT-2 (2 blocks, width 32), briefly trained on CORPUS, with a word-level tokenizer that has
    <bos>, <eos> and <pad>."""
    torch.manual_seed(0)
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = ["<unk>", "<pad>", "<bos>", "<eos>"]
    tokenizer.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=n_positions,
        vocab_size=len(fast),
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    _fit_to_corpus(model, fast)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def _fit_to_corpus(model, tokenizer, steps: int = 60):
    """A few Adam steps on CORPUS, so that the LM's loss means something (ablating a layer hurts it)."""
    ids = [[tokenizer.bos_token_id, *tokenizer(doc)["input_ids"]] for doc in CORPUS]
    width = max(map(len, ids))
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    labels = torch.where(input_ids == tokenizer.pad_token_id, -100, input_ids)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    # One thread: these tensors are tiny, and on a busy machine extra threads only make them wait.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            model(input_ids=input_ids, labels=labels).loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


def save_tiny_bert(folder: Path) -> Path:
    """BERT (2 layers, width 32) with a WordPiece vocabulary of the corpus words (saved as vocab.txt)."""
    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def read_texts(dataset: str, max_documents: int | None = None) -> list[str]:
    """The first ``max_documents`` (all when None) documents of ``dataset``, as a list."""
    from itertools import islice

    from jumprelu_ext.train.data.text import iter_texts

    return list(islice(iter_texts(dataset), max_documents))
