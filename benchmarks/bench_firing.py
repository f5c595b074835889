"""What the trainer's per-feature firing statistics cost: one training step three ways, timed in
turn in the same run (so all three see the same allocator, cache and machine load):

- none: no statistics;
- acts pass: ``acts != 0`` summed over the batch after the step, one extra read of the [batch, F]
  activations (the trainer's former ``FiringTracker.update(acts)``, restated here);
- kernel counts: the forward kernel adds the per-feature counts to ``FiringTracker.counts``
  (``sae.loss(..., fire_counts=...)``) and ``add_tokens`` records the rows.

Reports each variant's extra time as a share of the plain step (the target is < 5% of a step).

    python benchmarks/bench_firing.py --device cpu --markdown benchmarks/RESULTS.md
    python benchmarks/bench_firing.py --device cuda --markdown benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from jumprelu_ext import JumpReLUSAE, jumprelu_l0  # noqa: E402
from jumprelu_ext.train.report.metrics import FiringTracker  # noqa: E402

SHAPES = {"cpu": [(384, 4096, 3072), (384, 4096, 16384)], "cuda": [(2304, 4096, 16384), (2304, 4096, 65536)]}
COLUMNS = [
    ("d_in", "d_in", 5, ""),
    ("batch", "batch", 5, ""),
    ("d_sae", "d_sae", 6, ""),
    ("step_ms", "step ms", 9, ".2f"),
    ("acts_pass_ms", "+ acts pass ms", 14, ".2f"),
    ("kernel_counts_ms", "+ kernel counts ms", 18, ".2f"),
    ("acts_pass_share", "acts pass / step", 16, ".1%"),
    ("kernel_counts_share", "kernel counts / step", 20, ".1%"),
    ("forward_op_ms", "fwd op ms", 9, ".2f"),
    ("forward_op_counted_ms", "fwd op counting ms", 18, ".2f"),
]
VARIANTS = ("none", "acts_pass", "kernel_counts")


def measure(d_in: int, batch: int, d_sae: int, device: torch.device, rounds: int) -> dict[str, object]:
    torch.manual_seed(0)
    sae = JumpReLUSAE(d_in, d_sae, bandwidth=0.05, init_threshold=0.05, device=device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=7e-5, betas=(0.0, 0.999), eps=1e-8)
    x = torch.randn(batch, d_in, device=device) / d_in**0.5
    firing = FiringTracker.for_sae(sae)

    def step(variant: str):
        """The trainer's step, with the firing statistics of ``variant``."""
        optimizer.zero_grad(set_to_none=True)
        counts = firing.counts if variant == "kernel_counts" else None
        loss = sae.loss(x, 1e-3, fire_counts=counts)
        loss.total.backward()
        sae.remove_parallel_decoder_grad()
        optimizer.step()
        sae.normalize_decoder()
        if variant == "acts_pass":  # the former FiringTracker.update(acts)
            fired = (loss.output.acts.detach() != 0).reshape(-1, d_sae)
            firing.counts += fired.sum(0, dtype=torch.int64)
        if variant != "none":
            firing.add_tokens(batch)

    # The fused forward op alone, with and without counting: the kernel's own share, measured
    # with less noise than a difference of whole steps.
    pre, theta = sae.pre_acts(x).detach(), sae.threshold.detach()

    def forward_op(counted: bool):
        jumprelu_l0(pre, theta, sae.bandwidth, fire_counts=firing.counts if counted else None)

    for variant in VARIANTS:
        step(variant)
    times = {variant: [] for variant in VARIANTS + ("op", "op_counted")}
    for r in range(rounds):  # rotate the order, so drift in the machine's speed hits all alike
        for variant in VARIANTS[r % 3 :] + VARIANTS[: r % 3]:
            times[variant] += harness.time_once_ms(lambda v=variant: step(v), device)
        times["op"] += harness.time_once_ms(lambda: forward_op(False), device)
        times["op_counted"] += harness.time_once_ms(lambda: forward_op(True), device)
    step_ms, acts_ms, kernel_ms = (statistics.median(times[v]) for v in VARIANTS)
    return {
        "d_in": d_in,
        "batch": batch,
        "d_sae": d_sae,
        "rounds": rounds,
        "step_ms": step_ms,
        "acts_pass_ms": acts_ms,
        "kernel_counts_ms": kernel_ms,
        "acts_pass_share": (acts_ms - step_ms) / step_ms,
        "kernel_counts_share": (kernel_ms - step_ms) / step_ms,
        "forward_op_ms": statistics.median(times["op"]),
        "forward_op_counted_ms": statistics.median(times["op_counted"]),
        "times_ms": times,  # every timed call, for the spread (JSONL only)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--quick", action="store_true", help="one tiny shape: a smoke test")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    env = harness.environment(device)
    shapes = [(32, 64, 256)] if args.quick else SHAPES[device.type]
    records = [{**env, **measure(*shape, device, args.rounds)} for shape in shapes]
    harness.publish(
        records,
        COLUMNS,
        env,
        name=f"{device.type}_firing",
        title=f"Firing statistics' share of a training step, {env['device_name']}",
        out_dir=args.out,
        markdown=args.markdown,
        section=f"firing:{device.type}",
    )
    print("\n".join(harness.table_lines(COLUMNS, records)))


if __name__ == "__main__":
    main()
