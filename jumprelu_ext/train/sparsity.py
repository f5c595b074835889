"""The sparsity coefficient λ: a fixed value warmed up from 0, or (``--target-l0``) a controller
that adapts it every step so the batch L0 settles at a target (docs/trainer.md#reaching-a-target-l0)."""

from __future__ import annotations

import math

from .schedules import l0_coefficient_at


class FixedCoefficient:
    """λ rises linearly from 0 to ``final`` over ``warmup_steps``, then stays."""

    def __init__(self, final: float, warmup_steps: int):
        self.final, self.warmup_steps = final, warmup_steps

    def at(self, step: int) -> float:
        return l0_coefficient_at(step, self.final, self.warmup_steps)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TargetL0Controller:
    """An integral controller in log space: after each step, with the batch's mean L0,
    log λ += gain · log((L0 + 1) / (target + 1)), the change clipped to ±max_change.

    Log space, because the L0 a λ gives spans decades and responds roughly to λ's ratio; integral,
    because the λ that holds the target is not known in advance and L0 responds to it with a lag
    (θ must move). Clipping the change bounds how fast λ runs away while the first steps' L0 is
    still that of the untrained SAE (about half the features)."""

    def __init__(self, target: float, initial: float, gain: float = 0.05, max_change: float = 0.05):
        self.target, self.gain, self.max_change = target, gain, max_change
        self.log_coefficient = math.log(initial)

    def at(self, step: int) -> float:
        return math.exp(self.log_coefficient)

    def observe(self, l0: float) -> None:
        error = math.log((l0 + 1.0) / (self.target + 1.0))
        self.log_coefficient += max(-self.max_change, min(self.max_change, self.gain * error))

    def state_dict(self) -> dict:
        return {"log_coefficient": self.log_coefficient}

    def load_state_dict(self, state: dict) -> None:
        self.log_coefficient = state["log_coefficient"]


def sparsity_coefficient(cfg):
    if cfg.target_l0 is not None:
        return TargetL0Controller(cfg.target_l0, cfg.l0_coefficient)
    return FixedCoefficient(cfg.l0_coefficient, cfg.sparsity_warmup_steps)
