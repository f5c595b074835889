"""Benchmark one full JumpReLU SAE training step: ours vs a SAELens-style eager SAE, or (with
``--compare sparse``) our sparse step vs our dense step.

A step is forward, loss (MSE + λ·L0), backward, projecting the decoder gradient, Adam
(β1 = 0, β2 = 0.999) and decoder renormalisation. `ours` is jumprelu_ext.JumpReLUSAE (fused
jumprelu_l0 op); `eager` is the same module with SAELens-style activation: the JumpReLU and Step
autograd Functions of benchmarks/baselines.py (two passes each way, [batch, F] masks saved for
backward). `sparse` is JumpReLUSAE's sparse step (docs/ops.md#the-sparse-step), `dense` its dense
one, on the same SAE: θ is set per feature from its pre-activations' mean and spread on a
calibration batch (not the timed one) so that the timed batch's L0 is about --l0; the L0 and the share of
[batch, F] entries in θ's window that result are reported. Same shapes, same data, same run;
inputs already on the device. Reports ms per step, tokens/s, the speed-up and peak memory (CUDA:
allocated above what is live before the step; CPU: each measurement runs in a process of its own
and reports its peak resident set above the one before its first step).

    python benchmarks/bench_train.py --device cpu                 # small CPU sizes
    python benchmarks/bench_train.py --device cuda --markdown benchmarks/RESULTS.md
    python benchmarks/bench_train.py --compare sparse --device cpu --d-in 384 --batch 4096 \
        --d-sae 16384,65536,262144 --markdown benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
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
    optimizer = torch.optim.Adam(sae.parameters(), lr=7e-5, betas=(0.0, 0.999), eps=1e-8, fused=True)  # as the trainer
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
    sae = cls(d_in, d_sae, init_threshold=0.1, device=x.device, step="dense")
    step = make_step(sae, x, precision)
    ms, reps = harness.measure_ms(step, x.device, PLAN)
    peak = harness.peak_memory_mib(step, x.device)
    return record(impl, d_in, d_sae, x, precision, ms, peak, reps)


def record(impl, d_in, d_sae, x, precision, ms, peak, reps, **extra) -> dict[str, object]:
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
        **extra,
    }


def realistic_sae(d_in: int, d_sae: int, x: torch.Tensor, l0: float, bandwidth: float, path: str) -> JumpReLUSAE:
    """An SAE whose θ_i sits z standard deviations above the mean of feature i's pre-activations
    on a calibration batch drawn apart from ``x``, with P(N(0, 1) > z) = l0 / d_sae: each feature
    fires on about that share of fresh rows (the pre-activations of random inputs are close to
    normal), so the timed batch's L0 is about ``l0``, as a trained SAE's is on new data."""
    torch.manual_seed(0)
    sae = JumpReLUSAE(d_in, d_sae, bandwidth=bandwidth, threshold_param="raw", device=x.device, step=path)
    calibration = torch.randn(4096, d_in, generator=torch.Generator().manual_seed(1)).to(x.device)
    calibration = calibration / calibration.pow(2).sum(-1).mean().sqrt()
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - l0 / d_sae)).item()
    with torch.no_grad():
        total = torch.zeros(d_sae, dtype=torch.float64, device=x.device)
        squares = torch.zeros_like(total)
        for chunk in calibration.split(256):
            pre = sae.pre_acts(chunk).double()
            total += pre.sum(0)
            squares += pre.pow(2).sum(0)
        mean = total / calibration.shape[0]
        std = (squares / calibration.shape[0] - mean.pow(2)).clamp_min(0).sqrt()
        sae.get_parameter("threshold").copy_((mean + z * std).clamp_min(1e-4).float())
    return sae


def support_fractions(sae: JumpReLUSAE, x: torch.Tensor) -> tuple[float, float]:
    """(L0, the share of [batch, F] entries in θ's window) on the timed batch."""
    with torch.no_grad():
        loss = sae.loss(x, L0_COEFFICIENT, step="sparse")
        window = ((loss.output.acts.flags & 2) != 0).sum().item() / (x.shape[0] * sae.d_sae)
    return loss.l0.item(), window


def measure_path(path: str, d_in: int, d_sae: int, batch: int, device, precision: str, l0: float, bandwidth: float):
    """One step kind, timed; on the CPU in this process, which the caller made for it alone."""
    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(2)).to(device)
    x = x / x.pow(2).sum(-1).mean().sqrt()
    sae = realistic_sae(d_in, d_sae, x, l0, bandwidth, path)
    measured_l0, window = support_fractions(sae, x)
    step = make_step(sae, x, precision)
    before = harness.process_status_mib("VmRSS")
    ms, reps = harness.measure_ms(step, x.device, PLAN)
    peak = harness.peak_memory_mib(step, x.device)
    if peak is None:  # CPU: the process's high-water mark above its resident set before the first step
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return record(path, d_in, d_sae, x, precision, ms, peak, reps, l0=measured_l0, window_fraction=window)


def measure_path_alone(args, path: str, d_sae: int, precision: str, l0: float) -> dict[str, object]:
    """``measure_path`` in a fresh process, so that its CPU peak memory is its own."""
    command = [sys.executable, __file__, "--worker", path, "--device", args.device, "--d-in", str(args.d_in)]
    command += ["--batch", str(args.batch), "--d-sae", str(d_sae), "--precisions", precision]
    command += ["--l0", str(l0), "--bandwidth", str(args.bandwidth)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


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

SPARSE_COLUMNS: list[harness.Column] = [
    ("precision", "precision", 13, ""),
    ("batch", "batch", 5, ""),
    ("d_in", "d_in", 5, ""),
    ("d_sae", "d_sae", 7, ""),
    ("l0", "L0", 6, ".1f"),
    ("window_fraction", "window share", 12, ".2e"),
    ("impl", "step", 6, ""),
    ("ms", "ms/step", 9, ".1f"),
    ("tokens_per_s", "tokens/s", 10, ".0f"),
    ("speedup_vs_dense", "vs dense", 8, ".2f"),
    ("memory_vs_dense", "peak mem vs dense", 17, ".2f"),
    ("peak_mib", "peak MiB", 9, ".0f"),
    ("reps", "reps", 4, ""),
]


def show(baseline: dict, ours: dict, env: dict, columns) -> list[dict]:
    for result in (baseline, ours):
        result.update(env)
        print(harness.table_lines(columns, [result], header=False)[0], flush=True)
    return [baseline, ours]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compare", choices=["eager", "sparse"], default="eager", help="the baseline: see above")
    parser.add_argument("--d-in", type=int, help="default: 2304 on CUDA, 256 on CPU")
    parser.add_argument("--batch", type=int, help="default: 4096 on CUDA, 1024 on CPU")
    parser.add_argument("--d-sae", help="comma-separated; default: 16384,131072 on CUDA, 4096 on CPU")
    parser.add_argument("--precisions", help="fp32-tf32 and/or bf16-autocast; default: both on CUDA, fp32 on CPU")
    parser.add_argument(
        "--l0",
        default="45",
        help="--compare sparse: the L0 θ is set for; comma-separated for several (where auto's threshold sits)",
    )
    parser.add_argument("--bandwidth", type=float, default=1e-3, help="--compare sparse: ε")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--markdown", type=Path, help="rewrite this device's training-step section of this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # measure_path_alone's child: one step kind
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    args.d_in = args.d_in or (2304 if cuda else 256)
    args.batch = args.batch or (4096 if cuda else 1024)
    d_saes = [int(v) for v in (args.d_sae or ("16384,131072" if cuda else "4096")).split(",")]
    precisions = (args.precisions or ("fp32-tf32,bf16-autocast" if cuda else "fp32")).split(",")
    torch.backends.cuda.matmul.allow_tf32 = True  # the "fp32-tf32" setting; no effect on CPU
    if args.worker:
        result = measure_path(
            args.worker, args.d_in, d_saes[0], args.batch, device, precisions[0], float(args.l0), args.bandwidth
        )
        print(json.dumps(result))
        return 0

    env = harness.environment(device)
    print(f"# {env['device_name']} | torch {env['torch_version']} | {env['threads']} threads | {env['date']}")
    columns = SPARSE_COLUMNS if args.compare == "sparse" else COLUMNS
    records = []
    print("\n".join(harness.table_lines(columns, [])))
    for precision in precisions:
        for d_sae in d_saes:
            if args.compare == "sparse":
                for l0 in (float(v) for v in args.l0.split(",")):
                    baseline, ours = (
                        measure_path_alone(args, path, d_sae, precision, l0) for path in ("dense", "sparse")
                    )
                    ours["speedup_vs_dense"] = baseline["ms"] / ours["ms"]
                    ours["memory_vs_dense"] = ours["peak_mib"] / baseline["peak_mib"]
                    records += show(baseline, ours, env, columns)
            else:
                x = torch.randn(args.batch, args.d_in, device=device)
                x = x / x.pow(2).sum(-1).mean().sqrt()  # E‖x‖² = 1, as the trainer scales inputs
                baseline, ours = (measure(impl, args.d_in, d_sae, x, precision) for impl in ("eager", "ours"))
                ours["speedup_vs_eager"] = baseline["ms"] / ours["ms"]
                if ours["peak_mib"] is not None:
                    ours["memory_vs_eager"] = ours["peak_mib"] / baseline["peak_mib"]
                records += show(baseline, ours, env, columns)
    kind = "sparse_step" if args.compare == "sparse" else "train"
    harness.publish(
        records,
        columns,
        env,
        name=f"{device.type}_{kind}",
        title=f"{'Sparse vs dense training step' if args.compare == 'sparse' else 'Training step'}, {env['device_name']}",
        out_dir=args.out,
        markdown=args.markdown,
        section=f"{kind}:{device.type}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
