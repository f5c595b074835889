"""NaN/inf in pre and empty tensors."""

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

import jumprelu_ext
from jumprelu_ext import reference

EPS = 0.1


def _with_nans(device, pre_dtype, theta_dtype):
    pre, theta = make_inputs((6, 9), pre_dtype, theta_dtype, device, seed=301, bandwidth=EPS)
    nan_mask = torch.zeros(6, 9, dtype=torch.bool)
    nan_mask[0, 0] = nan_mask[2, 5] = nan_mask[5, 8] = True
    nan_mask[3, :] = True  # a whole row
    pre = pre.masked_fill(nan_mask.to(device), float("nan"))
    return pre, theta, nan_mask


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pre_dtype,theta_dtype", DTYPE_PAIRS)
def test_nan_propagates(device, impl, pre_dtype, theta_dtype):
    pre, theta, nan_mask = _with_nans(device, pre_dtype, theta_dtype)
    clean = cpu(pre).masked_fill(nan_mask, 0.0)
    active = (clean.double() > cpu(theta).double()) & ~nan_mask

    acts = impl.jumprelu(pre, theta, EPS)
    assert torch.equal(cpu(acts).isnan(), nan_mask), "jumprelu: NaN must appear exactly where pre is NaN"
    assert_exact(cpu(acts).masked_fill(nan_mask, 0.0), torch.where(active, clean, torch.zeros_like(clean)), "acts")

    out = impl.step(pre, theta, EPS)
    assert not cpu(out).isnan().any()
    assert_exact(out, active.to(pre_dtype), "step (0 at NaN)")

    acts, l0 = impl.jumprelu_l0(pre, theta, EPS)
    assert torch.equal(cpu(acts).isnan(), nan_mask), "jumprelu_l0: NaN must appear exactly where pre is NaN"
    assert_exact(l0, active.sum(-1).float(), "l0 (NaN counts as inactive)")


@requires_compiled
@pytest.mark.parametrize("pre_dtype,theta_dtype", DTYPE_PAIRS)
def test_nan_gradients_match_reference(device, pre_dtype, theta_dtype):
    pre, theta, _ = _with_nans(device, pre_dtype, theta_dtype)
    pre.requires_grad_()
    theta.requires_grad_()
    g = rand_like_grad(pre.shape, pre_dtype, device, 302)
    g_l0 = rand_like_grad(pre.shape[:-1], torch.float32, device, 303)
    acts, l0 = jumprelu_ext.jumprelu_l0(pre, theta, EPS)
    gp, gt = grads([acts, l0], [pre, theta], [g, g_l0])
    assert_exact(gp, reference.input_grad(cpu(pre), cpu(theta), 1.0, cpu(g)), "grad_pre")
    expected, scale = reference_theta_grad(pre, theta, EPS, grad_acts=g, grad_l0=g_l0)
    assert not expected.isnan().any()  # NaN is outside every window
    assert_theta_grad_close(gt, expected, scale, theta_dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pre_dtype,theta_dtype", DTYPE_PAIRS)
def test_infinities(device, impl, pre_dtype, theta_dtype):
    theta = torch.tensor([0.5, 0.5, 0.5], dtype=theta_dtype, device=device)
    pre = torch.tensor([[float("inf"), float("-inf"), 0.75]], dtype=pre_dtype, device=device)
    acts = impl.jumprelu(pre, theta, EPS)
    assert cpu(acts)[0, 0].item() == float("inf") and cpu(acts)[0, 2].item() == 0.75
    assert_exact(impl.step(pre, theta, EPS), torch.tensor([[1.0, 0.0, 1.0]], dtype=pre_dtype), "step")
    assert_exact(impl.jumprelu_l0(pre, theta, EPS)[1], torch.tensor([2.0], dtype=torch.float32), "l0")
    if impl is jumprelu_ext:  # −inf: whatever pre·H gives, the same as the reference
        assert_exact(acts, reference.jumprelu_forward(cpu(pre), cpu(theta)), "acts")
    # ±inf lie outside every window: no θ-gradient, and finite.
    t = theta.clone().requires_grad_()
    (gt,) = torch.autograd.grad(impl.step(pre, t, EPS).sum(), t)
    assert_exact(gt, torch.zeros(3, dtype=theta_dtype), "step grad_threshold")


EMPTY_SHAPES = [(0, 5), (3, 0), (0,), (2, 0, 4), (0, 0), (4, 3, 0)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "pre_dtype,theta_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
    ids=["f32", "bf16-f32theta"],
)
def test_empty(device, impl, shape, pre_dtype, theta_dtype):
    features = shape[-1]
    pre = torch.zeros(shape, dtype=pre_dtype, device=device, requires_grad=True)
    theta = torch.full((features,), 0.5, dtype=theta_dtype, device=device, requires_grad=True)

    acts = impl.jumprelu(pre, theta, EPS)
    assert acts.shape == pre.shape and acts.dtype == pre_dtype and acts.device == pre.device
    gp, gt = grads([acts], [pre, theta], [torch.ones_like(acts)])
    assert_exact(gp, torch.zeros(shape, dtype=pre_dtype), "jumprelu grad_pre")
    assert_exact(gt, torch.zeros(features, dtype=theta_dtype), "jumprelu grad_threshold")

    out = impl.step(pre, theta, EPS)
    assert out.shape == pre.shape and out.dtype == pre_dtype
    gp, gt = grads([out], [pre, theta], [torch.ones_like(out)])
    assert_exact(gt, torch.zeros(features, dtype=theta_dtype), "step grad_threshold")

    acts, l0 = impl.jumprelu_l0(pre, theta, EPS)
    assert acts.shape == pre.shape
    # No features: zero active per row; no rows: an empty l0.
    assert_exact(l0, torch.zeros(shape[:-1], dtype=torch.float32), "l0")
    gp, gt = grads([acts, l0], [pre, theta], [torch.ones_like(acts), torch.ones_like(l0)])
    assert_exact(gp, torch.zeros(shape, dtype=pre_dtype), "jumprelu_l0 grad_pre")
    assert_exact(gt, torch.zeros(features, dtype=theta_dtype), "jumprelu_l0 grad_threshold")


@requires_compiled
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_empty_backward_ops(device, shape):
    ops = torch.ops.jumprelu_ext
    pre = torch.zeros(shape, device=device)
    theta = torch.full((shape[-1],), 0.5, device=device)
    g = torch.ones(shape, device=device)
    g_l0 = torch.ones(shape[:-1], device=device)
    zeros_theta = torch.zeros(shape[-1])
    gp, gt = ops.jumprelu_backward(g, pre, theta, EPS)
    assert_exact(gp, torch.zeros(shape), "jumprelu_backward grad_pre")
    assert_exact(gt, zeros_theta, "jumprelu_backward grad_threshold")
    assert_exact(ops.step_backward(g, pre, theta, EPS)[1], zeros_theta, "step_backward")
    for ga, gl in [(g, g_l0), (None, g_l0), (g, None), (None, None)]:
        gp, gt = ops.jumprelu_l0_backward(ga, gl, pre, theta, EPS)
        assert_exact(gp, torch.zeros(shape), "jumprelu_l0_backward grad_pre")
        assert_exact(gt, zeros_theta, "jumprelu_l0_backward grad_threshold")


@requires_compiled
def test_empty_output_grads_are_written_not_garbage(device):
    """grad_θ is allocated with empty(): with no rows it must still be zeroed."""
    ops = torch.ops.jumprelu_ext
    for _ in range(3):  # re-use of freed memory would show up as non-zero garbage
        junk = torch.full((1024,), 123.0, device=device)
        del junk
        pre = torch.zeros(0, 1024, device=device)
        theta = torch.full((1024,), 0.5, device=device)
        gt = ops.step_backward(torch.zeros(0, 1024, device=device), pre, theta, EPS)[1]
        assert_exact(gt, torch.zeros(1024), "grad_threshold with zero rows")
