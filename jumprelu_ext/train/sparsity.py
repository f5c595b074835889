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
    """A PI controller on log L0, in velocity form. After each step, with the batch's mean L0,
    the error e = log((L0 + 1) / (target + 1)) is smoothed, ē ← ē + smoothing · (e − ē), and

        log λ += integral_gain · ē + proportional_gain · (ē − ē_previous), clipped to ±max_change.

    Log space, because the L0 a λ gives spans decades and responds roughly to λ's ratio. The
    integral term finds the λ that holds the target, which is not known in advance. But the plant
    is itself an integrator with inertia (λ moves θ, and θ keeps moving until λ is back at its
    balance value), so an integral term alone overshoots: on the embedded data λ fell a
    thousandfold and L0 undershot to 16 of a target of 40. The proportional term brakes λ while
    L0 already moves toward the target; where the plant keeps up, ē then decays with a time
    constant of proportional_gain / integral_gain = 100 steps, so L0 approaches the target from
    one side. The smoothing (a 10-step average) keeps batch-to-batch noise in L0 from reaching
    λ through the proportional term. The clip bounds λ's change to about 5% a step while the
    untrained SAE fires a large share of its features (docs/trainer.md#reaching-a-target-l0)."""

    def __init__(
        self,
        target: float,
        initial: float,
        integral_gain: float = 0.05,
        proportional_gain: float = 5.0,
        smoothing: float = 0.1,
        max_change: float = 0.05,
    ):
        self.target, self.max_change = target, max_change
        self.integral_gain, self.proportional_gain, self.smoothing = integral_gain, proportional_gain, smoothing
        self.log_coefficient = math.log(initial)
        self.error: float | None = None  # ē; none before the first batch, which then sets it

    def at(self, step: int) -> float:
        return math.exp(self.log_coefficient)

    def observe(self, l0: float) -> None:
        error = math.log((l0 + 1.0) / (self.target + 1.0))
        previous = error if self.error is None else self.error
        self.error = previous + self.smoothing * (error - previous)
        change = self.integral_gain * self.error + self.proportional_gain * (self.error - previous)
        self.log_coefficient += max(-self.max_change, min(self.max_change, change))

    def state_dict(self) -> dict:
        return {"log_coefficient": self.log_coefficient, "error": self.error}

    def load_state_dict(self, state: dict) -> None:
        self.log_coefficient = state["log_coefficient"]
        self.error = state.get("error")  # absent in checkpoints of the earlier integral-only controller


def sparsity_coefficient(cfg):
    if cfg.target_l0 is not None:
        return TargetL0Controller(cfg.target_l0, cfg.l0_coefficient)
    return FixedCoefficient(cfg.l0_coefficient, cfg.warmup("sparsity_warmup_steps"))
