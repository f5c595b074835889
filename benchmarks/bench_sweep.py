"""A λ sweep from one stream against separate runs: three streamed ``--model`` runs of the
embedded default (all-MiniLM-L6-v2 block 3 on pydoc-topics, d_sae 3072), one per λ, against one
run with ``--l0-coefficient`` given the three values, on the same tokens.

    python benchmarks/bench_sweep.py                          # 100 steps of 512 tokens, once
    python benchmarks/bench_sweep.py --steps 100 --repeats 2  # the order alternates between repeats
    python benchmarks/bench_sweep.py --expansion-factor 2 --buffer-tokens 32768  # harvest-bound

The defaults are SAE-bound on a CPU (d_sae 3072; the text fits in one fill, harvested once). With
a small SAE and fills smaller than the text, every training row is harvested as it is needed and
the model's forward, the part a sweep shares, dominates.

Each run is a process of its own, timed from start to exit (model load, held-out harvest, the
loop, evaluation and plots: what a user waits for), and its loop alone (the trainer's
``train_tokens_per_s`` in eval.json). Three separate runs harvest every activation three times;
the sweep harvests once and steps three SAEs on each batch. The benchmark also checks that each
SAE of the sweep is bitwise the separate run with its λ. A row per measurement goes to
``benchmarks/results/<time>_cpu_sweep.jsonl`` and a summary to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import environment, write_jsonl
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def train(out: Path, lambdas: str, args) -> dict:
    """Run the trainer on the embedded default in a process of its own; wall and loop seconds."""
    steps, batch_size = args.steps, args.batch_size
    command = [
        sys.executable,
        "-m",
        "jumprelu_ext.train",
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        str(batch_size),
        "--l0-coefficient",
        lambdas,
        "--log-every",
        str(steps),
        "--checkpoint-every",
        "0",
        "--eval-windows",
        str(args.eval_windows),
        "--expansion-factor",
        str(args.expansion_factor),
        "--buffer-tokens",
        str(args.buffer_tokens),
        "--device",
        "cpu",
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    folders = [out / f"l0_coefficient-{float(v):g}" for v in lambdas.split(",")] if "," in lambdas else [out]
    rate = json.loads((folders[0] / "eval.json").read_text())["train_tokens_per_s"]
    return {"wall_s": wall, "loop_s": steps * batch_size / rate, "folders": folders}


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "sae_weights.safetensors"), load_file(b / "sae_weights.safetensors")
    return set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows (the default 256 costs minutes)")
    parser.add_argument("--lambdas", default="2e-3,4e-3,8e-3")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--expansion-factor", type=int, default=8, help="d_sae = this x 384")
    parser.add_argument("--buffer-tokens", type=int, default=262_144, help="the trainer's default")
    args = parser.parse_args()

    env = environment(torch.device("cpu"))
    env["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    results = ROOT / "benchmarks" / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}_cpu_sweep.jsonl"
    lambdas = args.lambdas.split(",")
    settings = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lambdas": args.lambdas,
        "eval_windows": args.eval_windows,
        "expansion_factor": args.expansion_factor,
        "buffer_tokens": args.buffer_tokens,
    }
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = ["separate", "sweep"] if repeat % 2 == 0 else ["sweep", "separate"]
            timings = {}
            for kind in order:
                base = Path(tmp) / f"{kind}-{repeat}"
                if kind == "sweep":
                    timings[kind] = train(base, args.lambdas, args)
                else:
                    runs = [train(base / v, v, args) for v in lambdas]
                    timings[kind] = {
                        "wall_s": sum(r["wall_s"] for r in runs),
                        "loop_s": sum(r["loop_s"] for r in runs),
                        "folders": [r["folders"][0] for r in runs],
                    }
            identical = all(map(same_weights, timings["sweep"]["folders"], timings["separate"]["folders"]))
            record = {
                **env,
                **settings,
                "repeat": repeat,
                "order": "/".join(order),
                "separate_wall_s": timings["separate"]["wall_s"],
                "sweep_wall_s": timings["sweep"]["wall_s"],
                "wall_ratio": timings["sweep"]["wall_s"] / timings["separate"]["wall_s"],
                "separate_loop_s": timings["separate"]["loop_s"],
                "sweep_loop_s": timings["sweep"]["loop_s"],
                "loop_ratio": timings["sweep"]["loop_s"] / timings["separate"]["loop_s"],
                "sweep_equals_separate_bitwise": identical,
            }
            write_jsonl(results, [record])
            ratios.append(record)
            print(
                f"repeat {repeat} ({record['order']}): three separate runs {record['separate_wall_s']:.1f} s "
                f"(loops {record['separate_loop_s']:.1f} s), one sweep {record['sweep_wall_s']:.1f} s "
                f"(loop {record['sweep_loop_s']:.1f} s): ratio {record['wall_ratio']:.3f} wall, "
                f"{record['loop_ratio']:.3f} loop; sweep SAEs bitwise equal to the separate runs: {identical}",
                flush=True,
            )
    print(
        f"{env['device_name']}, torch {env['torch_version']}, {env['threads']} threads, {env['date']}; "
        f"{args.steps} steps x {args.batch_size} tokens, d_sae {384 * args.expansion_factor}, buffer "
        f"{args.buffer_tokens} tokens, lambda {args.lambdas}; results in {results}"
    )


if __name__ == "__main__":
    main()
