"""Gradients: the θ pseudo-derivative against the paper's formula written out independently
(fp64 Python loops), float64 gradcheck of the differentiable pre path, and the three backward
ops called directly (incl. the optional-None arguments of jumprelu_l0_backward).
"""

import pytest
import torch
from conftest import (
    DTYPE_PAIRS,
    IMPLS,
    assert_exact,
    assert_theta_grad_close,
    cpu,
    grads,
    make_inputs,
    rand_like_grad,
    reference_theta_grad,
    requires_compiled,
)

from jumprelu_ext import reference

ops = torch.ops.jumprelu_ext

# The formula tests also run on the reference (IMPLS): it is the oracle of the other tests.


def formula_theta_grad(pre, theta, eps, g_acts=None, g_l0=None, step=False):
    """−(1/ε) Σ_rows 1[−ε/2 < pre−θ < ε/2] · (c·g_acts + g_l0), c = θ (JumpReLU) or 1 (step),
    element by element in Python floats (fp64)."""
    x = pre.detach().double().cpu().reshape(-1, pre.shape[-1]).tolist()
    t = theta.detach().double().cpu().tolist()
    ga = None if g_acts is None else g_acts.double().cpu().reshape(-1, pre.shape[-1]).tolist()
    gl = None if g_l0 is None else g_l0.double().cpu().reshape(-1).tolist()
    out = [0.0] * len(t)
    for r, row in enumerate(x):
        for j, value in enumerate(row):
            if -eps / 2 < value - t[j] < eps / 2:
                w = 0.0
                if ga is not None:
                    w += (1.0 if step else t[j]) * ga[r][j]
                if gl is not None:
                    w += gl[r]
                out[j] -= w / eps
    return torch.tensor(out, dtype=torch.float64)


def formula_pre_grad(pre, theta, g):
    return torch.where(pre.detach().cpu() > theta.detach().cpu(), g.cpu(), torch.zeros_like(g.cpu()))


SHAPES = [pytest.param((40, 6), id="2d"), pytest.param((3, 5, 6), id="3d"), pytest.param((6,), id="1d")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_theta_grad_matches_formula(device, impl, shape):
    eps = 0.05
    pre, theta = make_inputs(shape, torch.float64, torch.float64, device, seed=101, bandwidth=eps, window_frac=0.6)
    # Keep pre off the window edges so fp64 rounding of (pre − θ)/ε cannot flip a decision.
    u = (pre - theta) / eps
    pre = torch.where(((u.abs() - 0.5).abs() < 1e-6), theta, pre)
    pre.requires_grad_()
    theta.requires_grad_()
    g_acts = rand_like_grad(shape, torch.float64, device, 102)
    g_l0 = rand_like_grad(shape[:-1], torch.float32, device, 103)

    acts = impl.jumprelu(pre, theta, eps)
    gp, gt = torch.autograd.grad(acts, (pre, theta), g_acts)
    assert_exact(gp, formula_pre_grad(pre, theta, g_acts), "jumprelu grad_pre")
    expected = formula_theta_grad(pre, theta, eps, g_acts=g_acts)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(cpu(gt), expected, rtol=1e-12, atol=1e-9)

    (gt,) = torch.autograd.grad(impl.step(pre, theta, eps), theta, g_acts)
    torch.testing.assert_close(
        cpu(gt), formula_theta_grad(pre, theta, eps, g_acts=g_acts, step=True), rtol=1e-12, atol=1e-9
    )

    acts, l0 = impl.jumprelu_l0(pre, theta, eps)
    gp, gt = grads([acts, l0], [pre, theta], [g_acts, g_l0])
    assert_exact(gp, formula_pre_grad(pre, theta, g_acts), "jumprelu_l0 grad_pre")
    torch.testing.assert_close(cpu(gt), formula_theta_grad(pre, theta, eps, g_acts, g_l0), rtol=1e-12, atol=1e-9)

    # The L0 term alone: λ·Σ_rows l0 with λ = 1 gives −(1/ε)·(number of rows in the window).
    (gt,) = torch.autograd.grad(impl.jumprelu_l0(pre, theta, eps)[1].sum(), theta)
    in_window = ((cpu(pre) - cpu(theta)).abs() < eps / 2).reshape(-1, shape[-1]).sum(0).double()
    torch.testing.assert_close(cpu(gt), -in_window / eps, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
def test_theta_grad_sums_over_all_leading_dims(device, impl):
    """A [2, 3, 4, F] input gives the same θ-gradient as its [24, F] reshape and as the sum of
    per-slice gradients."""
    eps = 0.1
    pre, theta = make_inputs((2, 3, 4, 5), torch.float64, torch.float64, device, seed=111, bandwidth=eps)
    theta.requires_grad_()
    g = rand_like_grad(pre.shape, torch.float64, device, 112)
    (full,) = torch.autograd.grad(impl.jumprelu(pre, theta, eps), theta, g)
    (flat,) = torch.autograd.grad(impl.jumprelu(pre.reshape(-1, 5), theta, eps), theta, g.reshape(-1, 5))
    per_slice = sum(
        torch.autograd.grad(impl.jumprelu(pre[i, j], theta, eps), theta, g[i, j])[0] for i in range(2) for j in range(3)
    )
    assert full.shape == (5,) and full.abs().sum() > 0
    torch.testing.assert_close(full, flat, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(full, per_slice, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_theta_chain_rule_through_log_threshold(device, impl):
    """θ = exp(log θ): ordinary autograd outside the op multiplies by θ."""
    eps = 0.1
    pre, theta = make_inputs((30, 4), torch.float64, torch.float64, device, seed=121, bandwidth=eps)
    log_theta = theta.log().requires_grad_()
    g = rand_like_grad(pre.shape, torch.float64, device, 122)
    (got,) = torch.autograd.grad(impl.jumprelu(pre, log_theta.exp(), eps), log_theta, g)
    expected = formula_theta_grad(pre, log_theta.exp(), eps, g_acts=g) * cpu(log_theta.exp())
    torch.testing.assert_close(cpu(got), expected, rtol=1e-12, atol=1e-9)


def _gradcheck_inputs(device, shape, seed):
    """fp64 pre at least 0.05 away from θ, so H is locally constant for gradcheck's steps."""
    g = torch.Generator().manual_seed(seed)
    theta = 0.2 + 0.6 * torch.rand(shape[-1], generator=g, dtype=torch.float64)
    offset = 0.05 + torch.rand(shape, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()
    pre = theta + sign * offset
    return pre.to(device).requires_grad_(), theta.to(device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(5,), (4, 6), (2, 3, 4)], ids=["1d", "2d", "3d"])
def test_gradcheck_pre(device, impl, shape):
    pre, theta = _gradcheck_inputs(device, shape, seed=131)
    assert ((pre > theta).any() and (pre < theta).any()).item()
    eps = 1e-3
    assert torch.autograd.gradcheck(lambda p: impl.jumprelu(p, theta, eps), (pre,))
    assert torch.autograd.gradcheck(lambda p: impl.jumprelu_l0(p, theta, eps)[0], (pre,))
    # Both outputs: l0 is locally constant in pre, so its analytical gradient must be zero too.
    assert torch.autograd.gradcheck(lambda p: impl.jumprelu_l0(p, theta, eps), (pre,))
    assert torch.autograd.gradcheck(lambda p: impl.step(p, theta, eps), (pre,))


# ---------------------------------------------------------------------------------------------
# The backward ops called directly.


def _direct_inputs(device, pre_dtype, theta_dtype, shape=(23, 11), seed=141):
    eps = 0.1
    pre, theta = make_inputs(shape, pre_dtype, theta_dtype, device, seed=seed, bandwidth=eps)
    g_acts = rand_like_grad(shape, pre_dtype, device, seed + 1)
    g_l0 = rand_like_grad(shape[:-1], torch.float32, device, seed + 2)
    return pre, theta, eps, g_acts, g_l0


@requires_compiled
@pytest.mark.parametrize("pre_dtype,theta_dtype", DTYPE_PAIRS)
def test_jumprelu_backward_op(device, pre_dtype, theta_dtype):
    pre, theta, eps, g, _ = _direct_inputs(device, pre_dtype, theta_dtype)
    grad_pre, grad_theta = ops.jumprelu_backward(g, pre, theta, eps)
    assert grad_pre.device == pre.device and grad_theta.device == pre.device
    assert_exact(grad_pre, reference.input_grad(cpu(pre), cpu(theta), 1.0, cpu(g)), "grad_pre")
    expected, scale = reference_theta_grad(pre, theta, eps, grad_acts=g)
    assert_theta_grad_close(grad_theta, expected, scale, theta_dtype)


@requires_compiled
@pytest.mark.parametrize("pre_dtype,theta_dtype", DTYPE_PAIRS)
def test_step_backward_op(device, pre_dtype, theta_dtype):
    pre, theta, eps, g, _ = _direct_inputs(device, pre_dtype, theta_dtype)
    grad_theta = ops.step_backward(g, pre, theta, eps)[1]
    expected, scale = reference_theta_grad(pre, theta, eps, grad_acts=g, step=True)
    assert_theta_grad_close(grad_theta, expected, scale, theta_dtype)


@requires_compiled
@pytest.mark.parametrize("with_acts,with_l0", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("pre_dtype,theta_dtype", DTYPE_PAIRS)
def test_jumprelu_l0_backward_op(device, pre_dtype, theta_dtype, with_acts, with_l0):
    pre, theta, eps, g_acts, g_l0 = _direct_inputs(device, pre_dtype, theta_dtype)
    g_acts = g_acts if with_acts else None
    g_l0 = g_l0 if with_l0 else None
    grad_pre, grad_theta = ops.jumprelu_l0_backward(g_acts, g_l0, pre, theta, eps)
    expected_pre = (
        torch.zeros_like(cpu(pre)) if g_acts is None else reference.input_grad(cpu(pre), cpu(theta), 1.0, cpu(g_acts))
    )
    assert_exact(grad_pre, expected_pre, "grad_pre")
    expected, scale = reference_theta_grad(pre, theta, eps, grad_acts=g_acts, grad_l0=g_l0)
    if g_acts is None and g_l0 is None:
        assert_exact(grad_theta, torch.zeros_like(cpu(theta)), "grad_threshold")
    else:
        assert cpu(expected).abs().sum() > 0
        assert_theta_grad_close(grad_theta, expected, scale, theta_dtype)


@requires_compiled
def test_backward_ops_accept_non_contiguous_and_expanded_grads(device):
    """Autograd hands over expanded (stride-0) or transposed gradients, e.g. from .sum()/.mean()."""
    pre, theta, eps, g_acts, g_l0 = _direct_inputs(device, torch.float32, torch.float32, shape=(12, 9))
    g_t = g_acts.t().contiguous().t()
    g_expanded = torch.full((), 0.7, device=device).expand(pre.shape)
    g_l0_expanded = torch.full((), -1.3, device=device).expand(pre.shape[:-1])
    for ga, gl in [(g_t, None), (g_expanded, g_l0_expanded), (None, g_l0_expanded)]:
        got = ops.jumprelu_l0_backward(ga, gl, pre, theta, eps)
        ga_c = None if ga is None else ga.contiguous()
        gl_c = None if gl is None else gl.contiguous()
        expected = ops.jumprelu_l0_backward(ga_c, gl_c, pre, theta, eps)
        ref_pre = (
            torch.zeros_like(cpu(pre)) if ga is None else reference.input_grad(cpu(pre), cpu(theta), 1.0, cpu(ga_c))
        )
        assert_exact(got[0], ref_pre, "grad_pre")
        ref, scale = reference_theta_grad(pre, theta, eps, grad_acts=ga_c, grad_l0=gl_c)
        assert_theta_grad_close(got[1], ref, scale, torch.float32)
        assert_exact(got[1], expected[1], "grad_threshold vs contiguous grads")
