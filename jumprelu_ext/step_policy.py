"""Which step an SAE takes: the dense one (six products over [batch, F]) or the sparse one (one
product, then work that follows the support). ``auto`` measures the support's density, the
fraction of [batch, F] entries that are active or in θ's window, and takes the sparse step while
it is below the break-even density measured in docs/ops.md#when-the-sparse-step-pays."""

from __future__ import annotations

STEPS = ("auto", "sparse", "dense")

# The sparse step breaks even with the dense one at a support density of about 3% (measured on the
# CPU, docs/ops.md#when-the-sparse-step-pays), so auto switches to it below 1.5% and back above
# 2.5%: a margin on the slow side, and no flapping.
SPARSE_BELOW = 0.015
DENSE_ABOVE = 0.025
# In the dense step the support is not formed: auto counts it every this many steps.
MEASURE_EVERY = 10


class StepPolicy:
    """``choose`` before a step, ``observe`` after it with the support density it saw.

    ``auto`` starts dense: an untrained SAE fires on a large share of its features, where the
    sparse step would be slower. A loss that needs every entry (the pre-activation loss) is
    dense under ``auto`` and refused under ``sparse``."""

    def __init__(self, mode: str = "auto"):
        if mode not in STEPS:
            raise ValueError(f"step must be one of {STEPS}, got {mode!r}")
        self.mode = mode
        self.sparse = mode == "sparse"
        self.dense_steps = 0  # dense steps since the density was last measured

    def choose(self, needs_every_entry: bool) -> str:
        if needs_every_entry:
            if self.mode == "sparse":
                raise ValueError(
                    "the sparse step cannot compute the pre-activation loss (it needs every entry of "
                    "[batch, F]): use step 'auto' or 'dense', or pre_act_loss_coefficient 0"
                )
            return "dense"
        if self.mode != "auto":
            return self.mode
        return "sparse" if self.sparse else "dense"

    def wants_density(self, path: str) -> bool:
        """Whether the dense step should count its support this time (the sparse step always knows)."""
        return self.mode == "auto" and path == "dense" and self.dense_steps % MEASURE_EVERY == 0

    def observe(self, path: str, density: float | None) -> None:
        if self.mode != "auto":
            return
        self.dense_steps = self.dense_steps + 1 if path == "dense" else 0
        if density is not None:
            self.sparse = density < (DENSE_ABOVE if self.sparse else SPARSE_BELOW)

    # Checkpointed with the SAE, so that a resumed run takes the same steps as an uninterrupted one.
    def state_dict(self) -> dict:
        return {"sparse": self.sparse, "dense_steps": self.dense_steps}

    def load_state_dict(self, state: dict) -> None:
        if self.mode == "auto" and state:
            self.sparse, self.dense_steps = state["sparse"], state["dense_steps"]
