"""Agreement with benchmarks/baselines.py (the SAELens-style eager formulation, computing in the
input dtype) in float32 and float64, forward and both gradients, for all three ops."""

import sys
from pathlib import Path

import pytest
import torch

import jumprelu_ext

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import baselines  # noqa: E402  (benchmark-only code, not part of the package)
from conftest import BASELINE_TOL, cpu, grads, make_inputs, rand_like_grad

EPS = 0.1


def _inputs(device, dtype, shape, seed):
    pre, theta = make_inputs(shape, dtype, dtype, device, seed, bandwidth=EPS)
    # The baselines divide by a Python scalar; keep pre a little off the window edges so that a
    # reciprocal-multiply rounding difference cannot flip a window decision in either code.
    u = ((pre - theta) / EPS).double()
    pre = torch.where((u.abs() - 0.5).abs() < 1e-4, theta, pre)
    return pre.requires_grad_(), theta.requires_grad_()


def _close(got, expected, dtype, what):
    torch.testing.assert_close(cpu(got), cpu(expected), **BASELINE_TOL[dtype], msg=lambda m: f"{what}: {m}")


SHAPES = [pytest.param((64, 32), id="2d"), pytest.param((3, 7, 16), id="3d"), pytest.param((16,), id="1d")]
DTYPES = [torch.float32, torch.float64]

ELEMENTWISE_PAIRS = [
    pytest.param(jumprelu_ext.jumprelu, baselines.EagerJumpReLU.apply, id="jumprelu"),
    pytest.param(jumprelu_ext.step, baselines.EagerStep.apply, id="step"),
]


@pytest.mark.parametrize("ours_fn, eager_fn", ELEMENTWISE_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES)
def test_elementwise_op_vs_eager(device, dtype, shape, ours_fn, eager_fn):
    pre, theta = _inputs(device, dtype, shape, seed=201)
    g = rand_like_grad(shape, dtype, device, 202)
    ours = ours_fn(pre, theta, EPS)
    eager = eager_fn(pre, theta, EPS)
    _close(ours, eager, dtype, "output")
    got = grads([ours], [pre, theta], [g])
    expected = grads([eager], [pre, theta], [g])
    assert cpu(expected[1]).abs().sum() > 0
    _close(got[0], expected[0], dtype, "grad_pre")
    _close(got[1], expected[1], dtype, "grad_threshold")


@pytest.mark.parametrize("use", ["both", "acts", "l0"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES)
def test_jumprelu_l0_vs_eager(device, dtype, shape, use):
    pre, theta = _inputs(device, dtype, shape, seed=221)
    g_acts = rand_like_grad(shape, dtype, device, 222) if use != "l0" else None
    # l0 is float32 in ours, pre's dtype in the eager pair.
    g_l0 = rand_like_grad(shape[:-1], torch.float32, device, 223) if use != "acts" else None
    ours = jumprelu_ext.jumprelu_l0(pre, theta, EPS)
    eager = baselines.eager_jumprelu_l0(pre, theta, EPS)
    _close(ours[0], eager[0], dtype, "acts")
    _close(ours[1], eager[1].float(), dtype, "l0")
    got = grads(list(ours), [pre, theta], [g_acts, g_l0])
    expected = grads(list(eager), [pre, theta], [g_acts, None if g_l0 is None else g_l0.to(dtype)])
    assert cpu(expected[1]).abs().sum() > 0
    _close(got[0], expected[0], dtype, "grad_pre")
    _close(got[1], expected[1], dtype, "grad_threshold")


def test_sae_loss_gradients_vs_eager(device):
    """A small SAE loss (mse + λ·mean L0) through the fused op and through the eager baselines."""
    g = torch.Generator().manual_seed(231)
    d, f, n, lam = 8, 24, 96, 0.3
    x = torch.randn(n, d, generator=g).to(device)
    w_enc = (torch.randn(d, f, generator=g) / d**0.5).to(device)
    w_dec = w_enc.t().contiguous()
    log_theta = torch.full((f,), 0.2, device=device).log()

    def loss_and_grads(encode):
        params = [p.clone().requires_grad_() for p in (w_enc, w_dec, log_theta)]
        we, wd, lt = params
        acts, l0 = encode(x @ we, lt.exp(), EPS)
        loss = ((acts @ wd - x) ** 2).sum(-1).mean() + lam * l0.mean()
        return loss, torch.autograd.grad(loss, params)

    loss, got = loss_and_grads(jumprelu_ext.jumprelu_l0)
    loss_eager, expected = loss_and_grads(baselines.eager_jumprelu_l0)
    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=1e-6)
    assert expected[2].abs().sum() > 0
    for a, b, name in zip(got, expected, ["W_enc", "W_dec", "log_theta"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
