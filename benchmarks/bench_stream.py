"""Streaming ``--model`` training: harvest-only, train-only and streamed tokens/s, and peak RSS
against the number of training tokens, on the embedded default (all-MiniLM-L6-v2 block 3 on
pydoc-topics, batch 4096, d_sae 3072).

    python benchmarks/bench_stream.py                                  # 0.5M and 5M tokens
    python benchmarks/bench_stream.py --tokens 65536,655360 --buffer-tokens 16384

Every measurement runs in a process of its own (peak RSS is per process):

- ``harvest``: the stream alone (``StreamedBatches`` without the producer thread), batches drawn
  and dropped: the model's forward passes plus serving.
- ``train``: the trainer on activations already on disk (``--activations``, a cache of the same
  model written first with ``python -m jumprelu_ext.cache``), the SAE's steps alone.
- ``stream``: the trainer with ``--model``: harvest and steps together, the next fill harvested
  on the producer thread while the SAE trains.

Rates are the trainer's whole-loop ``train_tokens_per_s`` (eval.json) or, for ``harvest``, the same
count over the same loop of batches; start-up (model load, held-out set, first fill) is outside
all three. Peak RSS is the process's ``ru_maxrss``. A row per measurement goes to
``benchmarks/results/<time>_cpu_stream.jsonl`` and a table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH = 4096


def _train_flags(out: Path, steps: int, buffer_tokens: int) -> list[str]:
    return [
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--log-every",
        str(steps),
        "--checkpoint-every",
        "0",
        "--device",
        "cpu",
        "--buffer-tokens",
        str(buffer_tokens),
        "--lr-warmup-steps",
        str(min(50, steps)),
        "--sparsity-warmup-steps",
        str(min(200, steps)),
    ]


def child(mode: str, tokens: int, buffer_tokens: int, cache: str, out: Path) -> dict:
    """One measurement in this process: tokens/s over the loop and the process's peak RSS."""
    steps = max(1, tokens // BATCH)
    if mode == "harvest":
        from jumprelu_ext.train import distributed
        from jumprelu_ext.train.config import parse_args
        from jumprelu_ext.train.data.prepare import prepare_data

        cfg = parse_args(_train_flags(out, steps, buffer_tokens))  # the embedded default preset
        layout, device = distributed.init(cfg.device, False)
        data = prepare_data(cfg, device, layout)
        data.train.close()
        data.train.prefetch = False  # the harvest alone, on this thread
        start = time.perf_counter()
        for _ in range(steps):
            next(data.train)
        rate = steps * BATCH / (time.perf_counter() - start)
    else:
        from jumprelu_ext.train import loop

        flags = _train_flags(out, steps, buffer_tokens)
        if mode == "train":
            flags = ["--activations", cache, "--expansion-factor", "8", "--batch-size", str(BATCH), *flags]
            flags += ["--lr", "7e-4", "--threshold-lr", "2e-2", "--init-threshold", "0.02", "--bandwidth", "0.01"]
            flags += ["--l0-coefficient", "4e-3"]
        assert loop.main(flags) == 0
        rate = json.loads((out / "eval.json").read_text())["train_tokens_per_s"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "train_tokens": steps * BATCH, "tokens_per_s": rate, "peak_rss_mib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="524288,5242880", help="training token counts, comma-separated")
    p.add_argument("--buffer-tokens", type=int, default=32768, help="rows per fill (smaller than the text)")
    p.add_argument("--modes", default="harvest,train,stream", help="which measurements, comma-separated")
    p.add_argument("--rate-tokens", type=int, default=None, help="run harvest and train only at this count")
    p.add_argument("--child", nargs=4, metavar=("MODE", "TOKENS", "BUFFER", "CACHE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, tokens, buffer_tokens, cache = args.child
        with tempfile.TemporaryDirectory() as tmp:
            print("RESULT " + json.dumps(child(mode, int(tokens), int(buffer_tokens), cache, Path(tmp) / "run")))
        return

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    results = ROOT / "benchmarks" / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}_cpu_stream.jsonl"
    results.parent.mkdir(exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        modes = args.modes.split(",")
        counts = [int(t) for t in args.tokens.split(",")]
        if "train" in modes:  # activations for train-only: the text's first 128k tokens at most
            cache_tokens = str(min(131072, max(counts)))
            subprocess.run(
                [sys.executable, "-m", "jumprelu_ext.cache", "--out", str(cache), "--max-tokens", cache_tokens]
                + ["--device", "cpu"],
                check=True,
                env=env,
                capture_output=True,
            )
        for tokens in counts:
            for mode in modes:
                if args.rate_tokens and mode != "stream" and tokens != args.rate_tokens:
                    continue
                command = [sys.executable, __file__, "--child", mode, str(tokens), str(args.buffer_tokens), str(cache)]
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{mode} at {tokens} tokens failed:\n{done.stderr[-3000:]}")
                row = {**json.loads(line[7:]), "buffer_tokens": args.buffer_tokens, "threads": os.cpu_count()}
                rows.append(row)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(
                    f"{row['mode']:8s} {row['train_tokens']:>9d} tokens  {row['tokens_per_s']:>9.0f} tok/s  "
                    f"peak RSS {row['peak_rss_mib']:7.0f} MiB",
                    flush=True,
                )
    print(f"results in {results}")


if __name__ == "__main__":
    main()
