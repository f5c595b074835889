"""Exact edge cases of H and K, checked against numbers computed by hand.

H(u) = 1 iff u > 0: pre == θ gives acts 0, step 0 and l0 0 (and lies inside the window).
K(u) = 1 iff −½ < u < ½ (open): pre = θ ± ε/2 contributes nothing to the θ-gradient,
the nearest representable values inside do. θ = 0.5 and ε = 0.25 make all of these exact in
every dtype (0.375, 0.5, 0.625 and 0.25 are short binary fractions).
"""

import pytest
import torch
from conftest import DTYPE_PAIRS, IMPLS, assert_exact, cpu, grads, requires_compiled

import jumprelu_ext
from jumprelu_ext import reference

THETA, EPS = 0.5, 0.25


def _nextafter(value, toward, dtype):
    v = torch.tensor([value], dtype=dtype)
    return torch.nextafter(v, torch.tensor([toward], dtype=dtype))[0].item()


def _case(dtype):
    """(pre values, per-value in-window flag, per-value H flag) for one feature each."""
    in_lo = _nextafter(0.375, 1.0, dtype)  # first value above θ − ε/2: inside
    in_hi = _nextafter(0.625, 0.0, dtype)  # last value below θ + ε/2: inside
    out_lo = _nextafter(0.375, 0.0, dtype)
    out_hi = _nextafter(0.625, 1.0, dtype)
    values = [0.5, 0.375, 0.625, in_lo, in_hi, out_lo, out_hi]
    in_window = [True, False, False, True, True, False, False]
    active = [False, False, True, False, True, False, True]
    return values, in_window, active


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pre_dtype,theta_dtype", DTYPE_PAIRS)
def test_heaviside_and_window_edges(device, impl, pre_dtype, theta_dtype):
    values, in_window, active = _case(pre_dtype)
    n = len(values)
    # One feature per value (θ repeated), so every θ-gradient entry shows one element's contribution.
    pre = torch.tensor(values, dtype=pre_dtype, device=device).requires_grad_()
    theta = torch.full((n,), THETA, dtype=theta_dtype, device=device).requires_grad_()
    g = torch.tensor([3.0, 5.0, 7.0, 11.0, 13.0, 17.0, 19.0], dtype=pre_dtype, device=device)
    g_l0 = torch.tensor(2.0, dtype=torch.float32, device=device)

    expected_acts = torch.tensor([v if a else 0.0 for v, a in zip(values, active)], dtype=pre_dtype)
    expected_step = torch.tensor([1.0 if a else 0.0 for a in active], dtype=pre_dtype)
    expected_grad_pre = torch.tensor([gi if a else 0.0 for gi, a in zip(g.tolist(), active)], dtype=pre_dtype)
    # −(θ/ε)·g = −2g, −(1/ε)·g = −4g, −(1/ε)(θ·g + g_l0) = −4(0.5g + 2), inside the window only.
    jump_theta = torch.tensor([-2 * gi if w else 0.0 for gi, w in zip(g.tolist(), in_window)], dtype=theta_dtype)
    step_theta = torch.tensor([-4 * gi if w else 0.0 for gi, w in zip(g.tolist(), in_window)], dtype=theta_dtype)
    l0_theta = torch.tensor(
        [-4 * (0.5 * gi + 2) if w else 0.0 for gi, w in zip(g.tolist(), in_window)], dtype=theta_dtype
    )
    l0_only_theta = torch.tensor([-8.0 if w else 0.0 for w in in_window], dtype=theta_dtype)

    acts = impl.jumprelu(pre, theta, EPS)
    assert_exact(acts, expected_acts, "jumprelu")
    gp, gt = grads([acts], [pre, theta], [g])
    assert_exact(gp, expected_grad_pre, "jumprelu grad_pre")
    assert_exact(gt, jump_theta, "jumprelu grad_threshold")

    out = impl.step(pre, theta, EPS)
    assert_exact(out, expected_step, "step")
    gp, gt = grads([out], [pre, theta], [g])
    assert_exact(gp, torch.zeros(n, dtype=pre_dtype), "step grad_pre")
    assert_exact(gt, step_theta, "step grad_threshold")

    acts, l0 = impl.jumprelu_l0(pre, theta, EPS)
    assert_exact(acts, expected_acts, "jumprelu_l0 acts")
    assert_exact(l0, torch.tensor(float(sum(active)), dtype=torch.float32), "jumprelu_l0 l0")
    gp, gt = grads([acts, l0], [pre, theta], [g, g_l0])
    assert_exact(gp, expected_grad_pre, "jumprelu_l0 grad_pre")
    assert_exact(gt, l0_theta, "jumprelu_l0 grad_threshold")
    acts, l0 = impl.jumprelu_l0(pre, theta, EPS)
    gp, gt = grads([acts, l0], [pre, theta], [None, g_l0])
    assert_exact(gp, torch.zeros(n, dtype=pre_dtype), "jumprelu_l0 (l0 only) grad_pre")
    assert_exact(gt, l0_only_theta, "jumprelu_l0 (l0 only) grad_threshold")


@pytest.mark.parametrize("impl", IMPLS)
def test_boundaries_summed_over_rows(device, impl):
    """The same values as rows of one feature: only pre == θ and the two inside values count."""
    values = [0.5, 0.375, 0.625, 0.3750001, 0.6249999, 0.3749999, 0.6250001]
    pre = torch.tensor(values, dtype=torch.float64, device=device).unsqueeze(-1).requires_grad_()
    theta = torch.tensor([THETA], dtype=torch.float64, device=device).requires_grad_()
    g = torch.tensor([3.0, 5.0, 7.0, 11.0, 13.0, 17.0, 19.0], dtype=torch.float64, device=device).unsqueeze(-1)
    g_l0 = torch.tensor([1.0, 10.0, 100.0, 1000.0, 10000.0, 1e5, 1e6], dtype=torch.float32, device=device)
    acts, l0 = impl.jumprelu_l0(pre, theta, EPS)
    assert_exact(
        acts, torch.tensor([[0.0], [0.0], [0.625], [0.0], [0.6249999], [0.0], [0.6250001]], dtype=torch.float64)
    )
    assert_exact(l0, torch.tensor([0.0, 0, 1, 0, 1, 0, 1], dtype=torch.float32))
    gp, gt = grads([acts, l0], [pre, theta], [g, g_l0])
    assert_exact(gp, torch.tensor([[0.0], [0], [7], [0], [13], [0], [19]], dtype=torch.float64))
    # Rows 0, 3, 4 are inside: −4·Σ(0.5·g + g_l0) = −4·(1.5 + 1 + 5.5 + 1000 + 6.5 + 10000).
    torch.testing.assert_close(cpu(gt), torch.tensor([-4 * 11014.5], dtype=torch.float64), rtol=1e-15, atol=0)
    (gt,) = torch.autograd.grad(impl.jumprelu(pre, theta, EPS), theta, g)
    torch.testing.assert_close(cpu(gt), torch.tensor([-2.0 * (3 + 11 + 13)], dtype=torch.float64), rtol=1e-15, atol=0)
    (gt,) = torch.autograd.grad(impl.step(pre, theta, EPS), theta, g)
    torch.testing.assert_close(cpu(gt), torch.tensor([-4.0 * (3 + 11 + 13)], dtype=torch.float64), rtol=1e-15, atol=0)


def _ulp_neighbours(center, dtype, k):
    """The 2k+1 representable values of dtype around center (positive), in order."""
    int_type = {
        torch.float64: torch.int64,
        torch.float32: torch.int32,
        torch.float16: torch.int16,
        torch.bfloat16: torch.int16,
    }[dtype]
    base = torch.tensor([center], dtype=dtype).view(int_type)
    return (base + torch.arange(-k, k + 1, dtype=int_type)).view(dtype)


@requires_compiled
@pytest.mark.parametrize("bandwidth", [0.1, 1e-3, 0.3], ids=["eps0.1", "eps1e-3", "eps0.3"])
@pytest.mark.parametrize("pre_dtype,theta_dtype", DTYPE_PAIRS)
def test_window_edge_scan_matches_reference(device, pre_dtype, theta_dtype, bandwidth):
    """Every representable pre within 40 ulps of θ ± ε/2 (ε mostly not a power of two, so
    (pre−θ)/ε rounds): the kernel's per-element window decision and θ-gradient must equal the
    reference's bit for bit. Catches a closed window (<= instead of <), a window computed in
    pre's low precision instead of fp32, or a shifted edge."""
    theta_value = torch.tensor(0.7, dtype=pre_dtype).to(theta_dtype).item()
    pre = torch.cat(
        [
            _ulp_neighbours(theta_value - bandwidth / 2, pre_dtype, 40),
            _ulp_neighbours(theta_value + bandwidth / 2, pre_dtype, 40),
        ]
    ).unique()
    n = pre.numel()
    theta = torch.full((n,), theta_value, dtype=theta_dtype)
    g = torch.ones(n, dtype=pre_dtype)
    expected_jump = reference.threshold_grad(pre, theta, bandwidth, grad_acts=g)
    expected_step = reference.threshold_grad(pre, theta, bandwidth, grad_acts=g, step=True)
    # The scan is useful only if it crosses the edges: some values inside, some outside.
    inside = expected_step != 0
    if pre_dtype in (torch.float32, torch.float64) or bandwidth != 1e-3:
        assert inside.any() and (~inside).any()

    pre_d = pre.to(device).requires_grad_()
    theta_d = theta.to(device).requires_grad_()
    (gt,) = torch.autograd.grad(jumprelu_ext.jumprelu(pre_d, theta_d, bandwidth), theta_d, g.to(device))
    assert_exact(gt, expected_jump, "jumprelu grad_threshold")
    (gt,) = torch.autograd.grad(jumprelu_ext.step(pre_d, theta_d, bandwidth), theta_d, g.to(device))
    assert_exact(gt, expected_step, "step grad_threshold")
    acts, l0 = jumprelu_ext.jumprelu_l0(pre_d, theta_d, bandwidth)
    (gt,) = torch.autograd.grad(l0, theta_d, torch.tensor(1.0, dtype=pre_dtype, device=device))
    assert_exact(gt, expected_step, "jumprelu_l0 (l0 only) grad_threshold")
