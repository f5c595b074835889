"""Evaluation metrics for the JumpReLU SAE (docs/method.md#metrics).

- ``FiringTracker``: per-feature firing counts accumulated over a training window, for the
  dead fraction (never fired over the window) and dense fraction (firing on > 10% of tokens).
- ``evaluate``: L0, MSE, FVU, dead/dense fractions and firing rates over held-out activations.
- ``density_histogram``: histogram of log10 firing rates, never-firing features counted apart.

"Fired" means ``acts != 0``. A JumpReLU output is ``pre * H(pre - θ)`` with θ > 0, so a feature
that fired has ``acts = pre > θ > 0``; one that did not has ``+0.0`` or, for a negative ``pre``,
``-0.0`` (``pre * 0``). ``-0.0 == 0`` is True in IEEE arithmetic, so ``-0.0`` is (correctly)
not counted as firing. The ops' ``fire_counts`` count exactly this (docs/ops.md#fire-counts).
"""

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["FiringTracker", "evaluate", "density_histogram", "DensityHistogram"]


class FiringTracker:
    """Counts, per feature, the tokens it fired on (int64 [d_sae], on ``device``) and the tokens seen.

    The counts come from the forward kernel: pass ``counts`` as the SAE's (or op's)
    ``fire_counts`` and the pass adds each feature's fires to it, then call
    ``add_tokens(rows)`` for the rows that pass covered. No second pass over the activations.
    Rates and fractions are NaN while no token has been seen (an empty window says nothing).
    """

    def __init__(self, d_sae: int, device=None):
        if isinstance(d_sae, bool) or not isinstance(d_sae, int) or d_sae <= 0:
            raise ValueError(f"FiringTracker: d_sae must be a positive int, got {d_sae!r}")
        self.d_sae = d_sae
        self.counts = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.tokens = 0

    @classmethod
    def for_sae(cls, sae) -> "FiringTracker":
        """A tracker sized for ``sae`` and on its device."""
        return cls(sae.d_sae, device=sae.W_dec.device)

    def add_tokens(self, tokens: int) -> None:
        """Record ``tokens`` more tokens, whose fires a forward pass has added to ``counts``."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"FiringTracker.add_tokens: tokens must be an int >= 0, got {tokens!r}")
        self.tokens += tokens

    def firing_rate(self) -> torch.Tensor:
        """Fraction of tracked tokens each feature fired on (float64 [d_sae]; NaN if no tokens)."""
        if self.tokens == 0:
            return torch.full_like(self.counts, float("nan"), dtype=torch.float64)
        return self.counts.double() / self.tokens

    def dead_fraction(self) -> float:
        """Fraction of features that never fired over the tracked window (NaN if no tokens)."""
        if self.tokens == 0:
            return float("nan")
        return (self.counts == 0).double().mean().item()

    def dense_fraction(self, threshold: float = 0.1) -> float:
        """Fraction of features firing on more than ``threshold`` of the tokens (NaN if no tokens)."""
        if self.tokens == 0:
            return float("nan")
        return (self.firing_rate() > threshold).double().mean().item()

    def reset(self) -> None:
        self.counts.zero_()
        self.tokens = 0

    def state_dict(self) -> dict:
        return {"counts": self.counts.detach().cpu().clone(), "tokens": int(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        counts = state["counts"]
        if tuple(counts.shape) != (self.d_sae,):
            raise ValueError(f"FiringTracker.load_state_dict: counts shape {tuple(counts.shape)} != ({self.d_sae},)")
        tokens = int(state["tokens"])
        if tokens < 0:
            raise ValueError(f"FiringTracker.load_state_dict: tokens must be >= 0, got {tokens}")
        self.counts.copy_(counts.to(dtype=torch.int64))
        self.tokens = tokens


@torch.no_grad()
def evaluate(sae, batches: Iterable[torch.Tensor], input_scale: float = 1.0, dense_threshold: float = 0.1) -> dict:
    """Evaluate ``sae`` over held-out activations, in a single pass over ``batches``.

    Each batch is [..., d_in], already multiplied by ``input_scale`` (the scaling the SAE was
    trained with; it is recorded in the result, the data is not rescaled here). All metrics are
    in that scaled space. Runs in eval mode (restored afterwards) with autocast disabled: inputs
    are cast to fp32 (or the SAE's weight dtype if that is not fp32) and errors reduced in fp32,
    sums accumulated in float64.

    Returns a dict with
      ``l0``: mean active features per token;
      ``mse``: mean over tokens of ‖x − x̂‖² (summed over d_in);
      ``fvu``: Σ‖x − x̂‖² / Σ‖x − μ‖², μ the evaluation set's own mean. The denominator is
        accumulated in one pass by merging per-batch (mean, sum of squared deviations) per
        dimension with Chan et al.'s parallel update, in float64. This is exact algebraically,
        like Σ‖x‖² − N‖μ‖², but does not cancel catastrophically when ‖μ‖ ≫ spread;
      ``dead_fraction``, ``dense_fraction`` (firing on > ``dense_threshold`` of tokens): over
        the evaluation set;
      ``tokens``, ``input_scale``, and ``firing_rates`` (float64 CPU tensor [d_sae]).
    """
    params = list(sae.parameters())
    device = params[0].device
    fdtype = sae.W_enc.dtype  # fp32 for the trainer's (fp32-master) SAE
    tracker = FiringTracker(sae.d_sae, device=device)

    n = 0
    sum_err = torch.zeros((), dtype=torch.float64, device=device)
    sum_l0 = torch.zeros((), dtype=torch.float64, device=device)
    mean = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    m2 = torch.zeros(sae.d_in, dtype=torch.float64, device=device)

    was_training = sae.training
    sae.eval()
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            for x in batches:
                if x.dim() < 1 or x.shape[-1] != sae.d_in:
                    raise ValueError(f"evaluate: expected batches [..., d_in={sae.d_in}], got shape {tuple(x.shape)}")
                x = x.reshape(-1, sae.d_in).to(device=device, dtype=torch.float32)
                nb = x.shape[0]
                if nb == 0:
                    continue
                out = sae(x.to(fdtype), fire_counts=tracker.counts)  # the kernel counts fires
                tracker.add_tokens(nb)
                err = (x - out.reconstruction.float()).pow(2).sum(-1)
                sum_err += err.double().sum()
                sum_l0 += out.l0.double().sum()

                xd = x.double()
                mean_b = xd.mean(0)
                m2_b = (xd - mean_b).pow(2).sum(0)
                delta = mean_b - mean
                tot = n + nb
                mean = mean + delta * (nb / tot)
                m2 = m2 + m2_b + delta.pow(2) * (n * nb / tot)
                n = tot
    finally:
        sae.train(was_training)

    if n == 0:
        raise ValueError("evaluate: no tokens in batches")
    total_var = m2.sum().item()
    sse = sum_err.item()
    fvu = sse / total_var if total_var > 0 else float("nan")
    return {
        "l0": sum_l0.item() / n,
        "mse": sse / n,
        "fvu": fvu,
        "dead_fraction": tracker.dead_fraction(),
        "dense_fraction": tracker.dense_fraction(dense_threshold),
        "tokens": n,
        "input_scale": float(input_scale),
        "firing_rates": tracker.firing_rate().cpu(),
    }


class DensityHistogram(NamedTuple):
    counts: np.ndarray  # int64 [n_bins], over log10 of the positive firing rates
    edges: np.ndarray  # float64 [n_bins + 1], log10 firing rate
    never_fired: int  # features with rate 0 (log10 0 = -inf), not in ``counts``


def density_histogram(firing_rates, bins=50, range: tuple | None = None) -> DensityHistogram:
    """Histogram of log10 firing rate. ``bins`` is a count or a sequence of edges (as in
    ``numpy.histogram``). Features with rate 0 would be log10 0 = -inf: they are left out of
    the bins and reported as ``never_fired``. Returns (counts, edges, never_fired)."""
    if isinstance(firing_rates, torch.Tensor):
        firing_rates = firing_rates.detach().cpu().double().numpy()
    rates = np.asarray(firing_rates, dtype=np.float64).reshape(-1)
    if np.isnan(rates).any() or (rates < 0).any() or (rates > 1).any():
        raise ValueError("density_histogram: firing rates must lie in [0, 1] (no NaN)")
    fired = rates > 0
    counts, edges = np.histogram(np.log10(rates[fired]), bins=bins, range=range)
    return DensityHistogram(counts.astype(np.int64), edges, int((~fired).sum()))
