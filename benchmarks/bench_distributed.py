"""How the trainer's step time and memory per rank change with world size under torchrun.

Runs `python -m jumprelu_ext.train` on the same random activations (E‖x‖² = 1 after scaling)
alone (world size 1), then under `torchrun --nproc-per-node N` data parallel and with
--shard-features, and reads each run's last metrics.jsonl line: tokens/s over the last
logging window (data loading included, evaluation excluded) and rank 0's peak memory (peak
RSS of the process on CPU, peak CUDA allocation on a GPU). The same global batch in every run.

    python benchmarks/bench_distributed.py --device cpu --markdown benchmarks/RESULTS.md
    python benchmarks/bench_distributed.py --device cuda --world-sizes 1 --markdown benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

COLUMNS = [
    ("layout", "layout", 13, ""),
    ("world_size", "ranks", 5, ""),
    ("threads_per_rank", "threads/rank", 12, ""),
    ("batch", "global batch", 12, ""),
    ("d_in", "d_in", 5, ""),
    ("d_sae", "d_sae", 7, ""),
    ("ms_per_step", "ms/step", 9, ".1f"),
    ("tokens_per_s", "tokens/s", 9, ".0f"),
    ("speedup_vs_single", "vs 1 rank", 9, ".2f"),
    ("peak_mib", "peak MiB/rank", 13, ".0f"),
    ("memory_vs_single", "mem vs 1 rank", 13, ".2f"),
]


def run(layout: str, world_size: int, args, data: Path, out: Path) -> dict:
    steps = args.steps
    flags = [
        "--activations",
        str(data),
        "--out",
        str(out),
        "--device",
        args.device,
        "--d-sae",
        str(args.d_sae),
        "--batch-size",
        str(args.batch),
        "--steps",
        str(steps),
        "--log-every",
        str(steps - args.warmup_steps),
        "--checkpoint-every",
        "0",
        "--lr-warmup-steps",
        "1",
        "--threshold-lr",
        "1e-3",
        "--init-threshold",
        "0.01",
    ]
    if layout == "sharded":
        flags.append("--shard-features")
    threads = max(1, (os.cpu_count() or 1) // world_size) if args.device == "cpu" else 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if world_size == 1:
        command = [sys.executable, "-m", "jumprelu_ext.train", *flags]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={world_size}",
            "-m",
            "jumprelu_ext.train",
            *flags,
        ]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "layout": layout,
        "world_size": world_size,
        "threads_per_rank": threads,
        "batch": args.batch,
        "d_in": args.d_in,
        "d_sae": args.d_sae,
        "tokens_per_s": last["tokens_per_s"],
        "ms_per_step": args.batch / last["tokens_per_s"] * 1e3,
        "peak_mib": last["peak_memory_mib"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--world-sizes", default="1,2", help="comma-separated; 1 is the baseline")
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps before the timed window")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--markdown", type=Path, help="rewrite this device's scale-out section of this file")
    args = parser.parse_args()

    env = harness.environment(torch.device(args.device))
    print(f"# {env['device_name']} | torch {env['torch_version']} | {os.cpu_count()} CPUs | {env['date']}")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "acts.npy"
        np.save(data, np.random.default_rng(0).normal(size=(16 * args.batch, args.d_in)).astype(np.float32))
        for world_size in (int(w) for w in args.world_sizes.split(",")):
            for layout in ["single"] if world_size == 1 else ["data-parallel", "sharded"]:
                records.append({**run(layout, world_size, args, data, Path(tmp) / f"{layout}{world_size}"), **env})
    single = next((r for r in records if r["world_size"] == 1), None)
    for record in records:
        if single is not None:
            record["speedup_vs_single"] = record["tokens_per_s"] / single["tokens_per_s"]
            record["memory_vs_single"] = record["peak_mib"] / single["peak_mib"]
    print("\n".join(harness.table_lines(COLUMNS, records)))
    harness.publish(
        records,
        COLUMNS,
        env,
        name=f"{args.device}_distributed",
        title=f"Scale-out, {env['device_name']}",
        out_dir=args.out,
        markdown=args.markdown,
        section=f"distributed:{args.device}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
