"""Streaming ``--model`` training: harvest-only, train-only and streamed tokens/s, and peak RSS
against the number of training tokens, on the embedded default (all-MiniLM-L6-v2 block 3 on
pydoc-topics, batch 4096, d_sae 3072).

    python benchmarks/bench_stream.py                                  # 0.5M and 5M tokens
    python benchmarks/bench_stream.py --tokens 65536,655360 --buffer-tokens 16384
    python benchmarks/random_model.py /tmp/gpt2-random                 # a GPU machine without weights:
    python benchmarks/bench_stream.py --device cuda --model /tmp/gpt2-random --layer 6 --expansion-factor 32

Every measurement runs in a process of its own (peak RSS is per process):

- ``harvest``: the stream alone (``StreamedBatches`` without the producer thread), batches drawn
  and dropped: the model's forward passes plus serving.
- ``train``: the trainer on activations already on disk (``--activations``, shards of the same
  model written first with ``python -m jumprelu_ext.harvest``), the SAE's steps alone.
- ``stream``: the trainer with ``--model``: harvest and steps together, the next fill harvested
  on the producer thread while the SAE trains.

Rates are the trainer's whole-loop ``train_tokens_per_s`` (eval.json) or, for ``harvest``, the same
count over the same loop of batches; start-up (model load, held-out set, first fill) is outside
all three (a run stopped by SIGTERM reports the steps it logged and their median rate). Peak RSS
is the process's ``ru_maxrss``; the RSS is also sampled every few seconds, so
a row shows whether it levels off or keeps growing. ``cpu_cores`` is the process's CPU time over
its wall time (how many cores it kept busy); on CUDA a row also has the peak GPU memory
allocated. ``--expansion-factor`` sets the SAE's size in ``train`` and ``stream`` (8, the
preset's, by default; a smaller SAE makes a long run harvest-bound and quicker). ``--model``
(with ``--layer`` and ``--dataset``) replaces the embedded model; the rest of the preset's shape
(context 128, batch 4096) stays. A row per measurement goes to
``benchmarks/results/<time>_<device>_stream.jsonl`` (or ``--out``), a table and the ratios to stdout:

- streamed / the slower of harvest and train alone (the overlap target), and streamed / the
  serial rate 1 / (1/harvest + 1/train) (what running the two one after the other would give);
- peak RSS of the largest streamed run / that of the smallest (the bounded-memory target).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from harness import environment

ROOT = Path(__file__).resolve().parent.parent
BATCH = 4096


def _train_flags(out: Path, steps: int, buffer_tokens: int, args) -> list[str]:
    return [
        "--batch-size",
        str(BATCH),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--log-every",
        str(max(1, steps // 50)),  # progress in metrics.jsonl: a run stopped early still reports
        "--checkpoint-every",
        "0",
        "--device",
        args.device,
        "--buffer-tokens",
        str(buffer_tokens),
        "--lr-warmup-steps",
        str(min(50, steps)),
        "--sparsity-warmup-steps",
        str(min(200, steps)),
    ]


def _model_flags(args) -> list[str]:
    """The model, layer and text to stream, as the trainer and ``jumprelu_ext.harvest`` take them: the
    embedded preset's unless --model is given."""
    if args.model is None:
        return []
    return ["--model", args.model, "--layer", str(args.layer), "--dataset", args.dataset, "--context-length", "128"]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _sample_rss(samples: list, stop: threading.Event, every: float) -> None:
    start = time.perf_counter()
    while not stop.wait(every):
        samples.append([round(time.perf_counter() - start, 1), round(_rss_mib())])


def child(mode: str, tokens: int, buffer_tokens: int, cache: str, out: Path, args) -> dict:
    """One measurement in this process: tokens/s over the loop, the process's peak RSS (and on
    CUDA its peak GPU memory), RSS samples."""
    samples, stop = [], threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(samples, stop, 5.0), daemon=True)
    sampler.start()
    wall, cpu = time.perf_counter(), time.process_time()
    row = _measure(mode, tokens, buffer_tokens, cache, out, args)
    cores = (time.process_time() - cpu) / (time.perf_counter() - wall)
    stop.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device == "cuda":
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return {**row, "peak_rss_mib": peak, "cpu_cores": round(cores, 2), "rss_samples": samples}


def _measure(mode: str, tokens: int, buffer_tokens: int, cache: str, out: Path, args) -> dict:
    steps = max(1, tokens // BATCH)
    if mode == "harvest":
        from jumprelu_ext.train import distributed
        from jumprelu_ext.train.config import parse_args
        from jumprelu_ext.train.data.prepare import prepare_data

        cfg = parse_args([*_model_flags(args), *_train_flags(out, steps, buffer_tokens, args)])
        layout, device = distributed.init(cfg.device, False)
        data = prepare_data(cfg, device, layout)
        data.train.close()
        data.train.prefetch = False  # the harvest alone, on this thread
        start = time.perf_counter()
        for _ in range(steps):
            next(data.train)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rate = steps * BATCH / (time.perf_counter() - start)
    else:
        from jumprelu_ext.train import loop

        flags = [*_train_flags(out, steps, buffer_tokens, args), "--expansion-factor", str(args.expansion_factor)]
        if mode == "stream":
            flags = [*_model_flags(args), *flags]
        else:
            flags = ["--activations", cache, *flags]
            flags += ["--lr", "7e-4", "--threshold-lr", "2e-2", "--init-threshold", "0.02", "--bandwidth", "0.01"]
            flags += ["--l0-coefficient", "4e-3"]
        code = loop.main(flags)
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        if code == 0:
            rate = json.loads((out / "eval.json").read_text())["train_tokens_per_s"]
        elif code > 128 and logged:  # stopped by a signal (SIGTERM to this process): what it did until then
            rate = statistics.median(row["tokens_per_s"] for row in logged)
            return {"mode": mode, "train_tokens": logged[-1]["step"] * BATCH, "tokens_per_s": rate, "stopped": True}
        else:
            raise SystemExit(f"the trainer exited with {code}")
    return {"mode": mode, "train_tokens": steps * BATCH, "tokens_per_s": rate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="524288,5242880", help="training token counts, comma-separated")
    p.add_argument("--buffer-tokens", type=int, default=32768, help="rows per fill (smaller than the text)")
    p.add_argument("--modes", default="harvest,train,stream", help="which measurements, comma-separated")
    p.add_argument("--rate-tokens", type=int, default=None, help="run harvest and train only at this count")
    p.add_argument("--expansion-factor", type=int, default=8, help="the SAE's d_sae / d_model in train and stream")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--model", default=None, help="a model folder or name instead of the embedded model")
    p.add_argument("--layer", type=int, default=6, help="the block to hook, with --model")
    p.add_argument("--dataset", default="pydoc-topics", help="the text, with --model")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the JSON lines")
    p.add_argument("--child", nargs=4, metavar=("MODE", "TOKENS", "BUFFER", "CACHE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, tokens, buffer_tokens, cache = args.child
        with tempfile.TemporaryDirectory() as tmp:
            row = child(mode, int(tokens), int(buffer_tokens), cache, Path(tmp) / "run", args)
            print("RESULT " + json.dumps(row), flush=True)
        return

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    results = args.out / f"{time.strftime('%Y%m%d-%H%M%S')}_{args.device}_stream.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    setting = {
        "buffer_tokens": args.buffer_tokens,
        "expansion_factor": args.expansion_factor,
        "model": args.model or "embedded",
        **environment(torch.device(args.device)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        modes = args.modes.split(",")
        counts = [int(t) for t in args.tokens.split(",")]
        if "train" in modes:  # activations for train-only: the text's first 128k tokens at most
            cache_tokens = str(min(131072, max(counts)))
            subprocess.run(
                [sys.executable, "-m", "jumprelu_ext.harvest", "--out", str(cache), "--max-tokens", cache_tokens]
                + ["--device", args.device, *_model_flags(args)],
                check=True,
                env=env,
                capture_output=True,
            )
        for tokens in counts:
            for mode in modes:
                if args.rate_tokens and mode != "stream" and tokens != args.rate_tokens:
                    continue
                command = [sys.executable, __file__, "--child", mode, str(tokens), str(args.buffer_tokens), str(cache)]
                command += sys.argv[1:]  # the same device, model and SAE size
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{mode} at {tokens} tokens failed:\n{done.stderr[-3000:]}")
                row = {**json.loads(line[7:]), **setting}
                rows.append(row)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(
                    f"{row['mode']:8s} {row['train_tokens']:>9d} tokens  {row['tokens_per_s']:>9.0f} tok/s  "
                    f"peak RSS {row['peak_rss_mib']:7.0f} MiB  {row['cpu_cores']:.2f} cores busy"
                    + (f"  peak GPU {row['peak_gpu_mib']:7.0f} MiB" if "peak_gpu_mib" in row else "")
                    + (f"  (stopped early; {tokens} planned)" if row.get("stopped") else ""),
                    flush=True,
                )
    _summarise(rows)
    print(f"results in {results}")


def _summarise(rows: list[dict]) -> None:
    """The overlap ratio at the count where all three ran, and the peak-RSS ratio of the streamed runs."""
    by = {(r["mode"], r["train_tokens"]): r for r in rows}
    for (mode, tokens), stream in sorted(by.items()):
        if mode != "stream" or ("harvest", tokens) not in by or ("train", tokens) not in by:
            continue
        harvest, train = by["harvest", tokens]["tokens_per_s"], by["train", tokens]["tokens_per_s"]
        rate = stream["tokens_per_s"]
        print(
            f"at {tokens} tokens: streamed / slower alone = {rate / min(harvest, train):.2f}, "
            f"streamed / serial (1/(1/harvest + 1/train)) = {rate * (1 / harvest + 1 / train):.2f}"
        )
    streams = sorted((r["train_tokens"], r["peak_rss_mib"]) for r in rows if r["mode"] == "stream")
    if len(streams) > 1:
        (small, small_rss), (large, large_rss) = streams[0], streams[-1]
        print(f"peak RSS, streamed {large} / {small} tokens = {large_rss / small_rss:.3f}")


if __name__ == "__main__":
    main()
