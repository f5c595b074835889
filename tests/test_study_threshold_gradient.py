"""The θ-gradient study's own arithmetic (benchmarks/study_threshold_gradient.py), on cases with a
known answer: the per-row flip gain against the SAE's loss recomputed at θ ± h, the finite
difference and the batch estimate against the closed form ∂E[L]/∂θ = (θ² − λ)·p(θ) of a 1-D
problem, the batch variance against batches actually drawn, and Silverman's rule on a Gaussian."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import study_threshold_gradient as study  # noqa: E402

# 1-D problem: pre z = x ~ N(MU, SD), f = JumpReLU_θ(z), x̂ = f, L = (x − x̂)² + λ·H(z − θ).
# Off, L = z²; on, L = λ; so E[L](θ) = ∫_{−∞}^θ z² p(z) dz + λ·P(z > θ) and
# ∂E[L]/∂θ = (θ² − λ)·p(θ).
MU, SD, THETA, LAM = 0.3, 0.3, 0.5, 0.1
ROWS = 2_000_000


def normal_density(z):
    return math.exp(-0.5 * ((z - MU) / SD) ** 2) / (SD * math.sqrt(2 * math.pi))


EXACT = (THETA**2 - LAM) * normal_density(THETA)


@pytest.fixture(scope="module")
def toy():
    z = MU + SD * torch.randn(ROWS, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theta = torch.tensor([THETA], dtype=torch.float64)
    a = torch.where(z > theta, 0.0, z)  # ⟨x − x̂, w⟩ with w = 1: 0 when on (x̂ = x), z when off
    return z, a, theta


def test_flip_gain_matches_the_loss_recomputed_at_shifted_thresholds():
    gen = torch.Generator().manual_seed(1)
    d, features, rows = 6, 5, 400
    w = {
        "W_enc": torch.randn(d, features, generator=gen, dtype=torch.float64),
        "b_enc": torch.zeros(features, dtype=torch.float64),
        "W_dec": torch.randn(features, d, generator=gen, dtype=torch.float64),
        "b_dec": torch.randn(d, generator=gen, dtype=torch.float64),
        "threshold": torch.full((features,), 0.3, dtype=torch.float64),
    }
    x = torch.randn(rows, d, generator=gen, dtype=torch.float64)
    i, h, lam = 2, 0.4, 0.05

    def mean_loss(theta_i):
        shifted = dict(w, threshold=w["threshold"].clone().index_fill_(0, torch.tensor([i]), theta_i))
        pre, resid = study.encode_rows(shifted, x)
        return float((resid.pow(2).sum(1) + lam * (pre > shifted["threshold"]).sum(1)).mean())

    pre, resid = study.encode_rows(w, x)
    z, a = pre[:, [i]], resid @ w["W_dec"][[i]].T
    gain = study.flip_gain(z, a, w["W_dec"][[i]].pow(2).sum(1), w["threshold"][[i]], lam)
    fd, _, crossed = study.finite_difference(z, gain, w["threshold"][[i]], h)
    assert crossed.item() > 20  # the difference crosses many rows, so it tests something
    brute = (mean_loss(0.3 + h) - mean_loss(0.3 - h)) / (2 * h)
    assert fd.item() == pytest.approx(brute, rel=1e-8)  # float64 sums in another order


def test_finite_difference_matches_the_closed_form(toy):
    z, a, theta = toy
    gain = study.flip_gain(z, a, torch.ones(1, dtype=torch.float64), theta, LAM)
    fd, se, _ = study.finite_difference(z, gain, theta, 0.02)
    assert abs(fd.item() - EXACT) < 5 * se.item() + 1e-3  # + the O(h²) curvature term, ≈ 2e-4
    assert se.item() < 0.05 * EXACT


@pytest.mark.parametrize("kernel", study.KERNELS)
def test_batch_estimate_is_unbiased_as_eps_shrinks_and_wrong_ones_are_not(toy, kernel):
    z, a, theta = toy
    eps = 0.01
    terms = study.ste_row_terms(z, a, theta, LAM, eps, kernel)
    mean, var = study.batch_moments(terms, batch_size=ROWS)  # a batch of every row: its SE²
    tolerance = 5 * var.sqrt().item() + 0.05 * eps * normal_density(THETA)  # 5 SE + the O(ε) bias
    assert abs(mean.item() - EXACT) < tolerance
    without_theta = -study.kernel((z - theta) / eps, kernel) / eps * (-2 * a + LAM)
    assert abs(without_theta.mean().item() - EXACT) > 10 * tolerance


def test_batch_variance_matches_batches_drawn(toy):
    z, a, theta = toy
    terms = study.ste_row_terms(z, a, theta, LAM, 0.03)
    _, var = study.batch_moments(terms, batch_size=1000)
    drawn = terms[: ROWS // 1000 * 1000].view(-1, 1000).mean(1)  # 2,000 disjoint batches
    assert drawn.var().item() == pytest.approx(var.item(), rel=0.1)


def test_silverman_bandwidth_on_a_gaussian(toy):
    z, _, theta = toy
    eps = study.silverman_bandwidth(z, theta, fraction=1.0, batch_size=1024)  # every row: σ = SD
    expected = study.RECTANGLE_PER_GAUSSIAN_SD * 0.9 * SD * 1024 ** (-0.2)
    assert eps.item() == pytest.approx(expected, rel=0.01)
    assert study.RECTANGLE_PER_GAUSSIAN_SD == pytest.approx(3.48, abs=0.01)


@pytest.mark.parametrize("kernel", study.KERNELS)
def test_kernels_integrate_to_one_on_the_open_window(kernel):
    u = torch.linspace(-0.6, 0.6, 1_200_001, dtype=torch.float64)
    k = study.kernel(u, kernel)
    assert torch.trapezoid(k, u).item() == pytest.approx(1.0, abs=1e-4)
    assert k[(u <= -0.5) | (u >= 0.5)].abs().max().item() == 0
