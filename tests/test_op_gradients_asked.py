"""Gradients only where asked, double backward refused, and one non-finite-θ policy
(docs/ops.md#gradients-only-where-asked, #double-backward, #non-finite-θ)."""

import math

import pytest
import torch
from conftest import IMPLS, assert_exact, cpu, make_inputs, rand_like_grad, requires_compiled
from torch.utils._python_dispatch import TorchDispatchMode

import jumprelu_ext
from jumprelu_ext import reference

EPS = 0.1
ops = torch.ops.jumprelu_ext


class RecordOps(TorchDispatchMode):
    """Records every jumprelu_ext op call with its arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "jumprelu_ext":
            # Trailing arguments equal to their defaults arrive stripped: restore them.
            full = list(args) + [a.default_value for a in func._schema.arguments[len(args) :]]
            self.calls.append((func._opname, full, out))
        return out


def _inputs(device, requires_pre=True, requires_theta=True, shape=(12, 10)):
    pre, theta = make_inputs(shape, torch.float32, torch.float32, device, seed=900, bandwidth=EPS, window_frac=0.6)
    return pre.requires_grad_(requires_pre), theta.requires_grad_(requires_theta)


@pytest.mark.parametrize("impl", IMPLS)
def test_pre_grad_is_none_when_only_l0_is_used(device, impl):
    pre, theta = _inputs(device)
    _, l0 = impl.jumprelu_l0(pre, theta, EPS)
    l0.sum().backward()
    assert pre.grad is None
    assert cpu(theta.grad).abs().sum() > 0
    _, l0 = impl.jumprelu_l0(pre, theta, EPS, ste_to_input=True)  # with the flag, l0 does reach pre
    l0.sum().backward()
    assert pre.grad is not None and cpu(pre.grad).abs().sum() > 0


@requires_compiled
@pytest.mark.parametrize(
    "requires_pre,requires_theta", [(False, True), (True, False), (True, True)], ids=["theta", "pre", "both"]
)
@pytest.mark.parametrize("op", ["jumprelu", "step", "jumprelu_l0", "jumprelu_l0-l0only"])
def test_backward_asks_only_for_needed_grads(device, op, requires_pre, requires_theta):
    """The backward op is told which inputs need a gradient, and returns empty tensors (no
    [rows, F] allocation) for the others."""
    pre, theta = _inputs(device, requires_pre, requires_theta)
    name = op.split("-")[0]
    out = getattr(jumprelu_ext, name)(pre, theta, EPS)
    outputs = [out[1]] if op.endswith("l0only") else list(out) if isinstance(out, tuple) else [out]
    if name == "step" and not requires_theta:
        return  # no term of the step reaches pre without ste_to_input: nothing to differentiate
    with RecordOps() as rec:
        torch.autograd.backward([o.float().sum() for o in outputs])
    (call,) = [c for c in rec.calls if c[0].endswith("_backward")]
    _, args, (grad_pre, grad_theta) = call
    needs_pre, needs_theta = args[-2], args[-1]
    pre_gets_terms = name != "step" and not op.endswith("l0only")
    assert needs_pre == (requires_pre and pre_gets_terms)
    assert needs_theta == requires_theta
    assert grad_pre.numel() == (pre.numel() if needs_pre else 0)
    assert grad_theta.numel() == (theta.numel() if needs_theta else 0)
    assert (pre.grad is not None) == needs_pre
    assert (theta.grad is not None) == needs_theta


@requires_compiled
def test_unasked_outputs_of_direct_calls(device):
    """Direct calls: an output not asked for is an empty tensor, the other one unchanged."""
    pre, theta = _inputs(device, False, False)
    g = rand_like_grad(pre.shape, torch.float32, device, 901)
    g_l0 = rand_like_grad(pre.shape[:-1], torch.float32, device, 902)
    full = ops.jumprelu_l0_backward(g, g_l0, pre, theta, EPS)
    only_pre = ops.jumprelu_l0_backward(g, g_l0, pre, theta, EPS, False, True, False)
    only_theta = ops.jumprelu_l0_backward(g, g_l0, pre, theta, EPS, False, False, True)
    assert only_pre[1].shape == (0,) and only_theta[0].shape == (0,)
    assert_exact(only_pre[0], full[0], "grad_pre")
    assert_exact(only_theta[1], full[1], "grad_threshold")
    for op, grads in [(ops.jumprelu_backward, (g,)), (ops.step_backward, (g,))]:
        a = op(*grads, pre, theta, EPS, True, True, True)
        b = op(*grads, pre, theta, EPS, True, False, True)
        assert b[0].shape == (0,)
        assert_exact(b[1], a[1], f"{op} grad_threshold")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["jumprelu", "step", "jumprelu_l0"])
def test_double_backward_raises_naming_the_op(device, impl, op):
    pre, theta = _inputs(device)
    out = getattr(impl, op)(pre, theta, EPS, ste_to_input=True)
    loss = sum(o.float().pow(2).sum() for o in (out if isinstance(out, tuple) else (out,)))
    grad_pre, grad_theta = torch.autograd.grad(loss, (pre, theta), create_graph=True)
    with pytest.raises(RuntimeError, match=rf"jumprelu_ext::{op}: double backward is not supported"):
        (grad_pre.sum() + grad_theta.sum()).backward()


@pytest.mark.parametrize("impl", IMPLS)
def test_create_graph_alone_is_fine(device, impl):
    """create_graph=True (e.g. for another term) works; only differentiating our gradients fails."""
    pre, theta = _inputs(device)
    acts, l0 = impl.jumprelu_l0(pre, theta, EPS)
    (gp,) = torch.autograd.grad(acts.sum() + l0.sum(), pre, create_graph=True)
    expected = torch.autograd.grad(impl.jumprelu_l0(pre, theta, EPS)[0].sum(), pre)[0]
    assert_exact(gp.detach(), expected, "grad_pre under create_graph")


def _nonfinite_theta(device):
    pre, theta = make_inputs((16, 6), torch.float32, torch.float32, device, seed=910, bandwidth=EPS, window_frac=0.6)
    theta = theta.clone()
    theta[1], theta[3], theta[5] = math.inf, -math.inf, math.nan
    return pre, theta


@requires_compiled
@pytest.mark.parametrize("ste", [False, True], ids=["plain", "ste"])
def test_nonfinite_theta_l0_gradient_only(device, ste):
    """Only the L0 gradient flows: its term K((pre−θ)/ε)·g_l0 involves θ only through K, which is
    0 for a non-finite θ, so those θ gradients are 0 (not NaN), in the kernels as in the reference."""
    pre, theta = _nonfinite_theta(device)
    g_l0 = rand_like_grad(pre.shape[:-1], torch.float32, device, 911)
    got = ops.jumprelu_l0_backward(None, g_l0, pre, theta, EPS, ste)
    expected_theta = reference.threshold_grad(cpu(pre), cpu(theta), EPS, grad_l0=cpu(g_l0))
    assert_exact(got[1], expected_theta, "grad_threshold")
    assert torch.equal(cpu(got[1])[[1, 3, 5]], torch.zeros(3))
    assert cpu(got[1])[[0, 2, 4]].abs().sum() > 0
    expected_pre = reference.input_grad(cpu(pre), cpu(theta), EPS, grad_l0=cpu(g_l0), ste_to_input=ste)
    assert_exact(got[0], torch.zeros_like(cpu(pre)) if expected_pre is None else expected_pre, "grad_pre")


@requires_compiled
def test_nonfinite_theta_with_acts_gradient(device):
    """When grad_acts flows, the term θ·grad_acts meets 0·inf: NaN in the kernels and the reference
    alike (pre·H(pre−θ) semantics, docs/ops.md#non-finite-θ)."""
    pre, theta = _nonfinite_theta(device)
    g = rand_like_grad(pre.shape, torch.float32, device, 912)
    g_l0 = rand_like_grad(pre.shape[:-1], torch.float32, device, 913)
    got = ops.jumprelu_l0_backward(g, g_l0, pre, theta, EPS)
    expected = reference.threshold_grad(cpu(pre), cpu(theta), EPS, grad_acts=cpu(g), grad_l0=cpu(g_l0))
    assert torch.equal(cpu(got[1]).isnan(), expected.isnan())
    finite = ~expected.isnan()
    torch.testing.assert_close(cpu(got[1])[finite], expected[finite], rtol=1e-5, atol=1e-4)
