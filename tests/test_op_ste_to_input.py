"""ste_to_input (Anthropic, January 2025; SAELens 6.x ``jumprelu_ste_to_input``): pre also gets
the straight-through term, each element's θ term negated (docs/ops.md#ste_to_input).

Checked against an independent restatement of SAELens's JumpReLU/Step autograd Functions with
the flag (sae_lens/saes/jumprelu_sae.py: the flag subtracts the per-element threshold gradient
from the input gradient, the threshold gradient is unchanged), against sae_lens itself where it
is installed, through opcheck and torch.compile(fullgraph=True), and through JumpReLUSAE.
"""

import inspect

import pytest
import torch
from conftest import IMPLS, assert_exact, cpu, grads, make_inputs, rand_like_grad, requires_compiled

import jumprelu_ext
from jumprelu_ext import reference

EPS = 0.1


def _rectangle(u):
    return ((u > -0.5) & (u < 0.5)).to(u)


class SAELensJumpReLU(torch.autograd.Function):
    """SAELens 6.x JumpReLU with jumprelu_ste_to_input, restated (2-D x, input dtype)."""

    @staticmethod
    def forward(ctx, x, threshold, bandwidth, ste_to_input):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return (x * (x > threshold)).to(x)

    @staticmethod
    def backward(ctx, grad_output):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        x_grad = (x > threshold) * grad_output
        per_element = -(threshold / bw) * _rectangle((x - threshold) / bw) * grad_output
        if ctx.ste_to_input:
            x_grad = x_grad - per_element
        return x_grad, per_element.sum(dim=0), None, None


class SAELensStep(torch.autograd.Function):
    """SAELens 6.x Step with jumprelu_ste_to_input, restated."""

    @staticmethod
    def forward(ctx, x, threshold, bandwidth, ste_to_input):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return (x > threshold).to(x)

    @staticmethod
    def backward(ctx, grad_output):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        per_element = -(1.0 / bw) * _rectangle((x - threshold) / bw) * grad_output
        x_grad = -per_element if ctx.ste_to_input else None
        return x_grad, per_element.sum(dim=0), None, None


def _inputs(device, shape=(48, 20), seed=700):
    """fp64, pre kept off the window edges (SAELens divides by a Python scalar)."""
    pre, theta = make_inputs(shape, torch.float64, torch.float64, device, seed, bandwidth=EPS, window_frac=0.6)
    u = (pre - theta) / EPS
    pre = torch.where((u.abs() - 0.5).abs() < 1e-6, theta, pre)
    return pre.requires_grad_(), theta.requires_grad_()


def _close(got, expected, what):
    assert (got is None) == (expected is None), f"{what}: {got} vs {expected}"
    if got is not None:
        torch.testing.assert_close(cpu(got), cpu(expected), rtol=1e-12, atol=1e-9, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ste", [False, True], ids=["off", "on"])
def test_matches_saelens_math(device, impl, ste):
    pre, theta = _inputs(device)
    g = rand_like_grad(pre.shape, torch.float64, device, 701)
    g_l0 = rand_like_grad(pre.shape[:-1], torch.float32, device, 702)

    got = torch.autograd.grad(impl.jumprelu(pre, theta, EPS, ste), (pre, theta), g)
    expected = torch.autograd.grad(SAELensJumpReLU.apply(pre, theta, EPS, ste), (pre, theta), g)
    _close(got[0], expected[0], "jumprelu grad_pre")
    _close(got[1], expected[1], "jumprelu grad_threshold")

    got = torch.autograd.grad(impl.step(pre, theta, EPS, ste), (pre, theta), g, allow_unused=True)
    expected = torch.autograd.grad(SAELensStep.apply(pre, theta, EPS, ste), (pre, theta), g, allow_unused=True)
    _close(got[0], expected[0], "step grad_pre")
    _close(got[1], expected[1], "step grad_threshold")

    # The fused op against SAELens's pair: JumpReLU for acts, Step summed over features for L0.
    acts, l0 = impl.jumprelu_l0(pre, theta, EPS, ste)
    got = grads([acts, l0], [pre, theta], [g, g_l0])
    pair = [SAELensJumpReLU.apply(pre, theta, EPS, ste), SAELensStep.apply(pre, theta, EPS, ste).sum(-1)]
    expected = grads(pair, [pre, theta], [g, g_l0.double()])
    _close(got[0], expected[0], "jumprelu_l0 grad_pre")
    _close(got[1], expected[1], "jumprelu_l0 grad_threshold")
    if ste:  # the L0 term alone reaches pre only with the flag
        (gp,) = torch.autograd.grad(impl.jumprelu_l0(pre, theta, EPS, ste)[1], pre, g_l0)
        (ep,) = torch.autograd.grad(SAELensStep.apply(pre, theta, EPS, ste).sum(-1), pre, g_l0.double())
        _close(gp, ep, "jumprelu_l0 (l0 only) grad_pre")
        assert cpu(gp).abs().sum() > 0


@requires_compiled
@pytest.mark.parametrize("pre_dtype,theta_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_kernels_match_reference(device, pre_dtype, theta_dtype):
    """With the flag on, grad_pre is bit-identical to the reference (same per-element arithmetic)."""
    pre, theta = make_inputs((37, 24), pre_dtype, theta_dtype, device, seed=710, bandwidth=EPS, window_frac=0.6)
    g = rand_like_grad(pre.shape, pre_dtype, device, 711)
    g_l0 = rand_like_grad(pre.shape[:-1], torch.float32, device, 712)
    cases = [
        ("jumprelu", lambda i, p, t: [i.jumprelu(p, t, EPS, True)], [g]),
        ("step", lambda i, p, t: [i.step(p, t, EPS, True)], [g]),
        ("jumprelu_l0", lambda i, p, t: list(i.jumprelu_l0(p, t, EPS, True)), [g, g_l0]),
        ("jumprelu_l0 l0 only", lambda i, p, t: list(i.jumprelu_l0(p, t, EPS, True)), [None, g_l0]),
    ]
    for name, fn, out_grads in cases:
        results = []
        for impl, dev in [(jumprelu_ext, device), (reference, "cpu")]:
            p, t = pre.detach().to(dev).requires_grad_(), theta.detach().to(dev).requires_grad_()
            results.append(grads(fn(impl, p, t), [p], [None if x is None else x.to(dev) for x in out_grads])[0])
        assert cpu(results[1]).abs().sum() > 0
        assert_exact(results[0], results[1], f"{name} grad_pre")


@pytest.mark.parametrize("ste", [False, True], ids=["off", "on"])
def test_against_sae_lens(device, ste):
    """Against the installed sae_lens (skipped where it is not installed)."""
    jumprelu_sae = pytest.importorskip("sae_lens.saes.jumprelu_sae")
    takes_flag = len(inspect.signature(jumprelu_sae.JumpReLU.forward).parameters) >= 4
    if ste and not takes_flag:
        pytest.skip("this sae_lens has no jumprelu_ste_to_input")
    extra = (ste,) if takes_flag else ()
    pre, theta = _inputs(device)
    g = rand_like_grad(pre.shape, torch.float64, device, 721)
    for ours, theirs in [(jumprelu_ext.jumprelu, jumprelu_sae.JumpReLU), (jumprelu_ext.step, jumprelu_sae.Step)]:
        out = ours(pre, theta, EPS, ste)
        ref = theirs.apply(pre, theta, EPS, *extra)
        _close(out, ref, f"{theirs.__name__} forward")
        got = torch.autograd.grad(out, (pre, theta), g, allow_unused=True)
        expected = torch.autograd.grad(ref, (pre, theta), g, allow_unused=True)
        _close(got[0], expected[0], f"{theirs.__name__} grad_pre")
        _close(got[1], expected[1], f"{theirs.__name__} grad_threshold")


@requires_compiled
@pytest.mark.parametrize("op", ["jumprelu", "step", "jumprelu_l0"])
def test_opcheck_with_flag(device, op):
    ops = torch.ops.jumprelu_ext
    pre, theta = make_inputs((9, 8), torch.float32, torch.float32, device, seed=730, bandwidth=EPS)
    pre.requires_grad_()
    theta.requires_grad_()
    torch.library.opcheck(getattr(ops, op).default, (pre, theta, EPS, True))
    g = rand_like_grad(pre.shape, torch.float32, device, 731).detach()
    g_l0 = rand_like_grad(pre.shape[:-1], torch.float32, device, 732)
    p, t = pre.detach(), theta.detach()
    for needs_pre, needs_theta in [(True, True), (True, False), (False, True)]:
        flags = (True, needs_pre, needs_theta)
        if op == "jumprelu_l0":
            for ga, gl in [(g, g_l0), (None, g_l0), (g, None)]:
                torch.library.opcheck(ops.jumprelu_l0_backward.default, (ga, gl, p, t, EPS, *flags))
        else:
            torch.library.opcheck(getattr(ops, f"{op}_backward").default, (g, p, t, EPS, *flags))


@pytest.mark.slow
@requires_compiled
def test_compile_fullgraph_with_flag(device):
    pre, theta = make_inputs((16, 12), torch.float32, torch.float32, device, seed=740, bandwidth=EPS, window_frac=0.6)
    g = rand_like_grad(pre.shape, torch.float32, device, 741)
    g_l0 = rand_like_grad(pre.shape[:-1], torch.float32, device, 742)

    def fn(pre, theta):
        acts, l0 = jumprelu_ext.jumprelu_l0(pre, theta, EPS, ste_to_input=True)
        steps = jumprelu_ext.step(pre, theta, EPS, ste_to_input=True)
        return (acts * g).sum() + (l0 * g_l0).sum() + steps.sum()

    def run(f):
        p, t = pre.clone().requires_grad_(), theta.clone().requires_grad_()
        loss = f(p, t)
        loss.backward()
        return loss, p.grad, t.grad

    torch._dynamo.reset()
    loss, gp, gt = run(torch.compile(fn, fullgraph=True))
    eloss, egp, egt = run(fn)
    assert cpu(gp).abs().sum() > 0
    assert_exact(gp, egp, "grad_pre")  # the same kernels: only the graph around them is compiled
    torch.testing.assert_close(cpu(loss), cpu(eloss))
    torch.testing.assert_close(cpu(gt), cpu(egt), rtol=1e-5, atol=1e-5)


def test_sae_passes_the_flag(device):
    """JumpReLUSAE(ste_to_input=True): the L0 penalty alone reaches the encoder."""
    torch.manual_seed(750)
    x = torch.randn(64, 8, device=device)

    def encoder_grad(ste):
        torch.manual_seed(751)
        sae = jumprelu_ext.JumpReLUSAE(8, 16, bandwidth=0.5, init_threshold=0.3, ste_to_input=ste).to(device)
        sae.activate(sae.pre_acts(x))[1].sum().backward()
        return sae.W_enc.grad

    assert encoder_grad(False) is None  # the L0 count depends on pre only through H
    assert cpu(encoder_grad(True)).abs().sum() > 0
