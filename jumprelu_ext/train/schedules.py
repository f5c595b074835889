"""Pure schedule functions for the trainer (no torch state; usable inside ``LambdaLR``).

- ``lr_factor``: multiplier on the base learning rate: linear warm-up, then constant, cosine, or
  constant with a linear decay to 0 over the last ``TAIL_FRACTION`` of the steps.
- ``l0_coefficient_at``: the sparsity coefficient λ at a step: linear warm-up from 0, then constant.

Steps are 0-based: step 0 is the first optimiser step.
"""

from __future__ import annotations

import math

__all__ = ["DECAYS", "l0_coefficient_at", "lr_factor"]

DECAYS = ("none", "cosine", "tail")
TAIL_FRACTION = 0.2  # "tail": the last 20% of the steps decay linearly to 0 (as Anthropic's 2024 recipe)


def _check_nonneg_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: str = "none") -> float:
    """Learning-rate multiplier at ``step``.

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (so step 0 is not zero and
    step ``warmup_steps - 1`` reaches 1). After warm-up: 1 for ``decay="none"``; for
    ``decay="cosine"`` a half cosine from 1 at ``step = warmup_steps`` to 0 at ``step = total_steps``
    (and 0 beyond it); for ``decay="tail"`` 1 until the last ``TAIL_FRACTION`` of ``total_steps``,
    then a straight line to 0 at ``step = total_steps``.
    """
    _check_nonneg_int("step", step)
    _check_nonneg_int("warmup_steps", warmup_steps)
    _check_nonneg_int("total_steps", total_steps)
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {', '.join(DECAYS)}; got {decay!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "none":
        return 1.0
    if step >= total_steps:
        return 0.0
    if decay == "tail":
        tail = max(1, round(TAIL_FRACTION * total_steps))
        return min(1.0, (total_steps - step) / tail)
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def l0_coefficient_at(step: int, final: float, warmup_steps: int) -> float:
    """λ at ``step``: ``final * step / warmup_steps`` during warm-up (0 at step 0), then ``final``.

    ``warmup_steps = 0`` gives ``final`` from the first step.
    """
    _check_nonneg_int("step", step)
    _check_nonneg_int("warmup_steps", warmup_steps)
    if isinstance(final, bool) or not isinstance(final, (int, float)) or not math.isfinite(final):
        raise ValueError(f"final must be a finite number, got {final!r}")
    if final < 0:
        raise ValueError(f"final must be >= 0, got {final}")
    if step >= warmup_steps:
        return float(final)
    return float(final) * step / warmup_steps
