"""SAELens's own trainer (``SAETrainer``) training its JumpReLU SAE against the same trainer training
ours (``jumprelu_ext.saelens``, architecture "jumprelu_ext"): tokens/s and peak memory, side by side.

Each implementation trains the same SAE (SAELens's initialisation from one seed, SAELens's defaults:
bandwidth 0.05, decoder_init_norm 0.1, the "step" L0 penalty) on the same batches with the same
trainer step (``SAETrainer.step``: forward, loss, backward, gradient clipping, Adam, the trainer's
firing statistics). Rows:

- ``saelens``: ``sae_lens.JumpReLUTrainingSAE`` (its ``JumpReLU`` and ``Step`` autograd Functions);
- ``dense``: ours with ``jumprelu_ext_step="dense"``: the fused ``jumprelu_l0`` op alone;
- ``auto``: ours with the default ``jumprelu_ext_step="auto"``: the sparse step once the support is
  small (the ``sparse share`` column: the share of timed steps that took it).

An untrained SAE fires on about half its features, where no sparse step pays; a trained one on
tens. So θ is set per feature from its pre-activations on a calibration batch (apart from the timed
ones) such that each feature fires on about ``--l0``/F of fresh rows, as a trained SAE does on new
data; the inputs are N(0, I), i.e. E‖x‖² = d_in, what SAELens's ``expected_average_only_in``
normalisation gives. Each row runs in a process of its own (CPU: its resident high-water mark over
the timed steps above its resident set before the first step; CUDA: peak allocated above what is
live before a step).

    python benchmarks/bench_saelens.py --device cpu --d-sae 16384,65536 --markdown benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

IMPLS = ("saelens", "dense", "auto")


def make_sae(impl: str, d_in: int, d_sae: int, l0: float, bandwidth: float, device: torch.device):
    """SAELens's JumpReLU SAE (or ours with its weights), θ calibrated for an L0 of about l0."""
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    from jumprelu_ext.saelens import JumpReLUExtTrainingSAE, JumpReLUExtTrainingSAEConfig

    options = dict(d_in=d_in, d_sae=d_sae, jumprelu_bandwidth=bandwidth, device=str(device))
    torch.manual_seed(0)
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**options))
    calibration = torch.randn(4096, d_in, generator=torch.Generator().manual_seed(1)).to(device)
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - l0 / d_sae)).item()
    with torch.no_grad():
        total = torch.zeros(d_sae, dtype=torch.float64, device=device)
        squares = torch.zeros_like(total)
        for chunk in calibration.split(256):
            pre = (sae.process_sae_in(chunk) @ sae.W_enc + sae.b_enc).double()
            total += pre.sum(0)
            squares += pre.pow(2).sum(0)
        mean = total / calibration.shape[0]
        std = (squares / calibration.shape[0] - mean.pow(2)).clamp_min(0).sqrt()
        sae.threshold.copy_((mean + z * std).clamp_min(1e-4).float())
    if impl == "saelens":
        return sae
    ours = JumpReLUExtTrainingSAE(JumpReLUExtTrainingSAEConfig(**options, jumprelu_ext_step=impl))
    ours.load_state_dict(sae.state_dict())
    return ours


def measure(impl: str, d_in: int, d_sae: int, batch: int, device: torch.device, args) -> dict[str, object]:
    """SAETrainer steps of one implementation, timed (in this process, which the caller made for it)."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = make_sae(impl, d_in, d_sae, args.l0, args.bandwidth, device)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(batch, d_in, generator=g).to(device) for _ in range(4)]
    plan = harness.TimingPlan(warmup=args.warmup, min_reps=args.steps, max_reps=args.steps, budget_s=0.0)
    cfg = SAETrainerConfig(
        total_training_samples=batch * (plan.warmup + plan.max_reps + 2),
        train_batch_size_samples=batch,
        lr=7e-5,
        lr_end=7e-5,
        device=str(device),
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    sparse, l0s = [], []

    def step():
        out = trainer.step(batches[trainer.n_training_steps % len(batches)])
        trainer.n_training_steps += 1
        sparse.append(out.metrics.get("jumprelu_ext/sparse_step", 0.0))
        l0s.append(out.losses["l0_loss"].item())  # the "step" penalty with coefficient 1: the mean L0

    before = harness.process_status_mib("VmRSS")
    for _ in range(plan.warmup):  # auto measures the support here, and may take a dense step
        step()
    reset = _reset_peak_resident()
    ms, reps = harness.measure_ms(step, device, harness.TimingPlan(0, plan.min_reps, plan.max_reps, 0.0))
    peak = harness.peak_memory_mib(step, device)
    if peak is None:  # CPU: the high-water mark over the timed steps above the resident set before the first
        peak = (
            harness.process_status_mib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ) - before
    timed = slice(plan.warmup, plan.warmup + reps)
    return {
        "impl": impl,
        "d_in": d_in,
        "d_sae": d_sae,
        "batch": batch,
        "precision": "fp32",
        "ms": ms,
        "tokens_per_s": batch / ms * 1e3,
        "peak_mib": peak,
        "reps": reps,
        "l0": sum(l0s[timed]) / max(len(l0s[timed]), 1),
        "sparse_share": sum(sparse[timed]) / max(len(sparse[timed]), 1) if impl != "saelens" else None,
    }


def _reset_peak_resident() -> bool:
    """Restart the process's resident high-water mark (Linux: VmHWM), so that the peak reported
    is that of the timed steps; False where that is not possible (the lifetime peak is used)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure_alone(args, impl: str, d_sae: int) -> dict[str, object]:
    """``measure`` in a fresh process, so that its CPU peak memory is its own."""
    command = [sys.executable, __file__, "--worker", impl, "--device", args.device, "--d-in", str(args.d_in)]
    command += ["--batch", str(args.batch), "--d-sae", str(d_sae), "--l0", str(args.l0)]
    command += ["--bandwidth", str(args.bandwidth), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


COLUMNS: list[harness.Column] = [
    ("batch", "batch", 5, ""),
    ("d_in", "d_in", 4, ""),
    ("d_sae", "d_sae", 6, ""),
    ("impl", "impl", 7, ""),
    ("l0", "L0", 5, ".1f"),
    ("sparse_share", "sparse share", 12, ".2f"),
    ("ms", "ms/step", 8, ".0f"),
    ("tokens_per_s", "tokens/s", 8, ".0f"),
    ("speedup_vs_saelens", "vs SAELens", 10, ".2f"),
    ("peak_mib", "peak MiB", 8, ".0f"),
    ("memory_vs_saelens", "peak mem vs SAELens", 19, ".2f"),
    ("reps", "reps", 4, ""),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--d-in", type=int, default=384)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-sae", default="16384,65536", help="comma-separated")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {IMPLS}")
    parser.add_argument("--l0", type=float, default=64.0, help="the L0 θ is calibrated for")
    parser.add_argument("--bandwidth", type=float, default=0.05, help="jumprelu_bandwidth (SAELens's default)")
    parser.add_argument("--steps", type=int, default=5, help="timed trainer steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed trainer steps first (auto measures there)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--markdown", type=Path, help="rewrite this device's SAELens section of this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # measure_alone's child: one implementation
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    d_saes = [int(v) for v in args.d_sae.split(",")]
    if args.worker:
        print(json.dumps(measure(args.worker, args.d_in, d_saes[0], args.batch, device, args)))
        return 0
    impls = args.impls.split(",")
    if unknown := set(impls) - set(IMPLS):
        parser.error(f"--impls: unknown {sorted(unknown)}")

    import sae_lens

    env = harness.environment(device)
    env["sae_lens_version"] = sae_lens.__version__
    print(f"# {env['device_name']} | torch {env['torch_version']} | sae-lens {sae_lens.__version__} | {env['date']}")
    print("\n".join(harness.table_lines(COLUMNS, [])), flush=True)
    records = []
    for d_sae in d_saes:
        baseline = None
        for impl in impls:
            result = measure_alone(args, impl, d_sae)
            if impl == "saelens":
                baseline = result
            elif baseline is not None:
                result["speedup_vs_saelens"] = baseline["ms"] / result["ms"]
                result["memory_vs_saelens"] = result["peak_mib"] / baseline["peak_mib"]
            result.update(env)
            records.append(result)
            print(harness.table_lines(COLUMNS, [result], header=False)[0], flush=True)
    harness.publish(
        records,
        COLUMNS,
        env,
        name=f"{device.type}_saelens",
        title=f"SAETrainer, SAELens's JumpReLU vs jumprelu_ext (sae-lens {sae_lens.__version__}), {env['device_name']}",
        out_dir=args.out,
        markdown=args.markdown,
        section=f"saelens:{device.type}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
