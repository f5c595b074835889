"""Benchmark one full JumpReLU SAE training step: ours vs a SAELens-style eager SAE.

A step is forward, loss (MSE + λ·L0), backward, projecting the decoder gradient, Adam
(β1 = 0, β2 = 0.999) and decoder renormalisation. `ours` is jumprelu_ext.JumpReLUSAE (fused
jumprelu_l0 op); `eager` is the same module with SAELens-style activation: the JumpReLU and Step autograd Functions of benchmarks/baselines.py (two passes each way,
[batch, F] masks saved for backward). Same shapes, same data, same run; inputs already on
the device. Reports ms per step, tokens/s, the speed-up and (CUDA) peak memory.

    python benchmarks/bench_train.py --device cpu                 # small CPU sizes
    python benchmarks/bench_train.py --device cuda --markdown benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from baselines import eager_jumprelu_l0  # noqa: E402

from jumprelu_ext import JumpReLUSAE  # noqa: E402

L0_COEFFICIENT = 1e-3
PLAN = harness.TimingPlan(warmup=3, min_reps=5, max_reps=50, budget_s=3.0)


class EagerJumpReLUSAE(JumpReLUSAE):
    """The SAELens-style encoder on the same parameters (what the baseline computes)."""

    def activate(self, pre, fire_counts=None):
        if fire_counts is not None:
            raise NotImplementedError("the eager baseline does not count fires")
        return eager_jumprelu_l0(pre, self.threshold, self.bandwidth)


def make_step(sae: JumpReLUSAE, x: torch.Tensor, precision: str):
    optimizer = torch.optim.Adam(sae.parameters(), lr=7e-5, betas=(0.0, 0.999), eps=1e-8)
    autocast = (
        torch.autocast(x.device.type, dtype=torch.bfloat16)
        if precision == "bf16-autocast"
        else contextlib.nullcontext()
    )

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            sae.loss(x, L0_COEFFICIENT).total.backward()
        sae.remove_parallel_decoder_grad()
        optimizer.step()
        sae.normalize_decoder()

    return step


def measure(impl: str, d_in: int, d_sae: int, x: torch.Tensor, precision: str) -> dict[str, object]:
    torch.manual_seed(0)
    cls = JumpReLUSAE if impl == "ours" else EagerJumpReLUSAE
    sae = cls(d_in, d_sae, init_threshold=0.1, device=x.device)
    step = make_step(sae, x, precision)
    ms, reps = harness.measure_ms(step, x.device, PLAN)
    peak = harness.peak_memory_mib(step, x.device)
    return {
        "impl": impl,
        "d_in": d_in,
        "d_sae": d_sae,
        "batch": x.shape[0],
        "precision": precision,
        "ms": ms,
        "tokens_per_s": x.shape[0] / ms * 1e3,
        "peak_mib": peak,
        "reps": reps,
    }


COLUMNS: list[harness.Column] = [
    ("precision", "precision", 13, ""),
    ("batch", "batch", 5, ""),
    ("d_in", "d_in", 5, ""),
    ("d_sae", "d_sae", 7, ""),
    ("impl", "impl", 5, ""),
    ("ms", "ms/step", 9, ".2f"),
    ("tokens_per_s", "tokens/s", 10, ".0f"),
    ("speedup_vs_eager", "vs eager", 8, ".2f"),
    ("memory_vs_eager", "peak mem vs eager", 17, ".2f"),
    ("peak_mib", "peak MiB", 9, ".0f"),
    ("reps", "reps", 4, ""),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d-in", type=int, help="default: 2304 on CUDA, 256 on CPU")
    parser.add_argument("--batch", type=int, help="default: 4096 on CUDA, 1024 on CPU")
    parser.add_argument("--d-sae", help="comma-separated; default: 16384,131072 on CUDA, 4096 on CPU")
    parser.add_argument("--precisions", help="fp32-tf32 and/or bf16-autocast; default: both on CUDA, fp32 on CPU")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--markdown", type=Path, help="rewrite this device's training-step section of this file")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    d_in = args.d_in or (2304 if cuda else 256)
    batch = args.batch or (4096 if cuda else 1024)
    d_saes = [int(v) for v in (args.d_sae or ("16384,131072" if cuda else "4096")).split(",")]
    precisions = (args.precisions or ("fp32-tf32,bf16-autocast" if cuda else "fp32")).split(",")
    torch.backends.cuda.matmul.allow_tf32 = True  # the "fp32-tf32" setting; no effect on CPU

    env = harness.environment(device)
    print(f"# {env['device_name']} | torch {env['torch_version']} | {env['threads']} threads | {env['date']}")
    x = torch.randn(batch, d_in, device=device)
    x = x / x.pow(2).sum(-1).mean().sqrt()  # E‖x‖² = 1, as the trainer scales inputs
    records = []
    print("\n".join(harness.table_lines(COLUMNS, [])))
    for precision in precisions:
        for d_sae in d_saes:
            eager, ours = (measure(impl, d_in, d_sae, x, precision) for impl in ("eager", "ours"))
            ours["speedup_vs_eager"] = eager["ms"] / ours["ms"]
            if ours["peak_mib"] is not None:
                ours["memory_vs_eager"] = ours["peak_mib"] / eager["peak_mib"]
            for record in (eager, ours):
                record.update(env)
                records.append(record)
                print(harness.table_lines(COLUMNS, [record], header=False)[0])
    harness.publish(
        records,
        COLUMNS,
        env,
        name=f"{device.type}_train",
        title=f"Training step, {env['device_name']}",
        out_dir=args.out,
        markdown=args.markdown,
        section=f"train:{device.type}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
