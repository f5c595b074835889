"""The kernels' window test compares d = pre − θ with bounds found once per call instead of
dividing every element (csrc/window.h). It must decide exactly as the definition,
fl((pre − θ)/ε) ∈ (−½, ½), which the reference evaluates: swept here over many ε and the ulps
around both edges (docs/ops.md#window)."""

import math

import pytest
import torch
from conftest import cpu, requires_compiled

from jumprelu_ext import reference

pytestmark = requires_compiled
ops = torch.ops.jumprelu_ext


def _bandwidths(dtype, count, seed):
    """Powers of two (exact halves), random mantissas over the dtype's normal range, common values."""
    info = torch.finfo(dtype)
    lo, hi = math.log2(info.tiny) + 1, math.log2(info.max) - 2
    g = torch.Generator().manual_seed(seed)
    exps = lo + (hi - lo) * torch.rand(count, generator=g, dtype=torch.float64)
    random = (2.0**exps).to(dtype).tolist()
    common = [1e-3, 1e-2, 0.1, 0.5, 1.0, 3.0, 1 / 3, 2.0**-20, 0.3, 7e-4]
    return [e for e in common + [2.0**k for k in range(-60, 60, 7)] + random if info.tiny <= e <= info.max]


def _ulps_around(x, k, dtype):
    """The 2k+1 values of dtype nearest x, in order (x rounded to dtype first)."""
    center = torch.tensor(x, dtype=dtype)
    out, up, down = [center], center, center
    inf = torch.tensor(math.inf, dtype=dtype)
    for _ in range(k):
        up, down = torch.nextafter(up, inf), torch.nextafter(down, -inf)
        out += [up, down]
    return torch.stack(out)


def _case(dtype, theta_value, count, seed, k=6):
    """One feature per (ε, edge, ulp) element: pre = θ + d for d the ulps around ±ε/2 (and θ ± those
    edges rounded), with its ε. Returns pre [1, N], θ [N], ε list per block."""
    cases = []
    for eps in _bandwidths(dtype, count, seed):
        d = torch.cat([_ulps_around(eps / 2, k, dtype), _ulps_around(-eps / 2, k, dtype)])
        pre = (torch.tensor(theta_value, dtype=dtype) + d).to(dtype)
        cases.append((eps, pre))
    return cases


def _kernel_window(pre, theta, eps):
    """Per-element window decisions of the kernels: step's backward with ste_to_input gives
    grad_pre = K·g/ε per element (g = 1), and the θ gradient of a one-row input −K/ε per feature."""
    g = torch.ones_like(pre)
    grad_pre, grad_theta = ops.step_backward(g, pre, theta, eps, True, True, True)
    assert torch.equal(grad_pre != 0, -grad_theta.reshape(pre.shape) != 0)
    return grad_pre != 0


def _reference_window(pre, theta, eps):
    x, t = (
        pre.to(torch.float64 if pre.dtype == torch.float64 else torch.float32),
        theta.to(torch.float32 if pre.dtype != torch.float64 else torch.float64),
    )
    u = (x - t) / torch.full((), eps, dtype=x.dtype)
    return (u > -0.5) & (u < 0.5)


@pytest.mark.parametrize("theta_value", [0.0, 0.75, -3.0], ids=["theta0", "theta0.75", "theta-3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_window_edges_swept(device, dtype, theta_value):
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    checked = flips = 0
    for eps, pre in _case(compute if dtype in (torch.float32, torch.float64) else dtype, theta_value, 300, seed=800):
        if dtype in (torch.bfloat16, torch.float16):
            info = torch.finfo(torch.float32)
            if not info.tiny <= eps <= info.max:
                continue
        pre = pre.to(dtype).reshape(1, -1)
        theta = torch.full((pre.shape[-1],), theta_value, dtype=dtype)
        got = _kernel_window(pre.to(device), theta.to(device), eps)
        expected = _reference_window(pre, theta, eps)
        assert torch.equal(cpu(got), expected), (
            f"ε={eps!r}: kernel and definition disagree at pre={pre[~torch.eq(cpu(got), expected)].tolist()}"
        )
        checked += pre.numel()
        flips += int(expected.any()) and int((~expected).any())
    assert checked > 1000 and flips > 10  # the sweep does straddle the edges


def test_reference_window_is_the_definition():
    """The reference evaluates K((pre−θ)/ε) with a correctly rounded division (no reciprocal)."""
    eps = 0.1
    pre = _ulps_around(0.05, 3, torch.float32).reshape(1, -1)
    theta = torch.zeros(pre.shape[-1])
    terms = reference.threshold_terms(pre, theta, eps, grad_l0=torch.ones(1))
    assert torch.equal(terms != 0, _reference_window(pre, theta, eps))
