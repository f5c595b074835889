"""What the trainer's per-feature firing statistics cost: a training step with and without
``FiringTracker.update`` (one extra read of the [batch, F] activations per step), timed
alternately in the same run, so both see the same allocator and cache state. Reports the
update's share of a step (issue: fire counts could come from the forward kernel instead; that is
worth it only if this share is large).

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

from jumprelu_ext import JumpReLUSAE  # noqa: E402
from jumprelu_ext.train.report.metrics import FiringTracker  # noqa: E402

SHAPES = {"cpu": [(384, 4096, 3072), (384, 4096, 16384)], "cuda": [(2304, 4096, 16384), (2304, 4096, 65536)]}
COLUMNS = [
    ("d_in", "d_in", 5, ""),
    ("batch", "batch", 5, ""),
    ("d_sae", "d_sae", 6, ""),
    ("step_ms", "step ms", 9, ".2f"),
    ("step_with_firing_ms", "step + firing ms", 16, ".2f"),
    ("firing_share", "firing cost / step", 17, ".1%"),
]


def measure(d_in: int, batch: int, d_sae: int, device: torch.device, pairs: int) -> dict[str, object]:
    torch.manual_seed(0)
    sae = JumpReLUSAE(d_in, d_sae, bandwidth=0.05, init_threshold=0.05, device=device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=7e-5, betas=(0.0, 0.999), eps=1e-8)
    x = torch.randn(batch, d_in, device=device) / d_in**0.5
    firing = FiringTracker.for_sae(sae)

    def step(track: bool):
        """The trainer's step; with ``track``, its firing update on the step's own activations."""
        optimizer.zero_grad(set_to_none=True)
        loss = sae.loss(x, 1e-3)
        loss.total.backward()
        sae.remove_parallel_decoder_grad()
        optimizer.step()
        sae.normalize_decoder()
        if track:
            firing.update(loss.output.acts)

    step(True), step(False)
    with_firing, without = [], []
    for _ in range(pairs):  # alternate, so drift in the machine's speed hits both alike
        with_firing += harness.time_once_ms(lambda: step(True), device)
        without += harness.time_once_ms(lambda: step(False), device)
    step_ms, with_ms = statistics.median(without), statistics.median(with_firing)
    return {
        "d_in": d_in,
        "batch": batch,
        "d_sae": d_sae,
        "step_ms": step_ms,
        "step_with_firing_ms": with_ms,
        "firing_share": (with_ms - step_ms) / step_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="one tiny shape: a smoke test")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    env = harness.environment(device)
    shapes = [(32, 64, 256)] if args.quick else SHAPES[device.type]
    records = [{**env, **measure(*shape, device, args.pairs)} for shape in shapes]
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
