"""PyTorch integration: torch.library.opcheck of all six ops (schema, autograd registration,
fake kernels, AOT dispatch) and torch.compile(fullgraph=True) against eager.

Compile tests are the slow ones (10-30 s each on 2 cores): there are two per device.
"""

import pytest
import torch
from conftest import assert_exact, cpu, make_inputs, rand_like_grad, requires_compiled, with_layout

import jumprelu_ext

pytestmark = requires_compiled

EPS = 0.1


def _samples(device, requires_grad):
    """(pre, θ) samples: fp32 2-D, bf16 pre with fp32 θ 3-D, fp16 transposed, fp64 1-D sliced,
    and an empty batch."""
    specs = [
        ((8, 6), torch.float32, torch.float32, "contiguous"),
        ((2, 5, 6), torch.bfloat16, torch.float32, "contiguous"),
        ((7, 6), torch.float16, torch.float32, "transposed"),
        ((9, 5), torch.float16, torch.float16, "sliced"),
        ((6,), torch.float64, torch.float64, "sliced"),
        ((0, 4), torch.float32, torch.float32, "contiguous"),
    ]
    out = []
    for i, (shape, pre_dtype, theta_dtype, layout) in enumerate(specs):
        pre, theta = make_inputs(shape, pre_dtype, theta_dtype, device, seed=400 + i, bandwidth=EPS)
        pre = with_layout(pre, layout) if pre.numel() > 1 else pre
        out.append((pre.requires_grad_(requires_grad), theta.requires_grad_(requires_grad)))
    return out


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("op", ["jumprelu", "step", "jumprelu_l0"])
def test_opcheck_forward_ops(device, op, requires_grad):
    for pre, theta in _samples(device, requires_grad):
        torch.library.opcheck(getattr(torch.ops.jumprelu_ext, op).default, (pre, theta, EPS))


@pytest.mark.parametrize("op", ["jumprelu_backward", "step_backward", "jumprelu_l0_backward"])
def test_opcheck_backward_ops(device, op):
    ops = torch.ops.jumprelu_ext
    for i, (pre, theta) in enumerate(_samples(device, requires_grad=False)):
        g = rand_like_grad(pre.shape, pre.dtype, device, 450 + i)
        g_l0 = rand_like_grad(pre.shape[:-1], torch.float32, device, 460 + i)
        if op == "jumprelu_l0_backward":
            for ga, gl in [(g, g_l0), (None, g_l0), (g, None), (None, None)]:
                torch.library.opcheck(ops.jumprelu_l0_backward.default, (ga, gl, pre, theta, EPS))
        else:
            torch.library.opcheck(getattr(ops, op).default, (g, pre, theta, EPS))


def test_fake_kernels_shapes_and_dtypes(device):
    """Under FakeTensorMode the ops produce the real ops' shapes, dtypes and devices."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.jumprelu_ext
    for pre, theta in _samples(device, requires_grad=False):
        g, g_l0 = torch.ones_like(pre), torch.ones(pre.shape[:-1], device=device)
        real = [
            ops.jumprelu(pre, theta, EPS),
            ops.step(pre, theta, EPS),
            *ops.jumprelu_l0(pre, theta, EPS),
            *ops.jumprelu_backward(g, pre, theta, EPS),
            ops.step_backward(g, pre, theta, EPS)[1],
            *ops.jumprelu_l0_backward(g, g_l0, pre, theta, EPS),
            *ops.jumprelu_l0_backward(None, g_l0, pre, theta, EPS),
        ]
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fp, ft, fg, fgl = (mode.from_tensor(t) for t in (pre, theta, g, g_l0))
            fake = [
                ops.jumprelu(fp, ft, EPS),
                ops.step(fp, ft, EPS),
                *ops.jumprelu_l0(fp, ft, EPS),
                *ops.jumprelu_backward(fg, fp, ft, EPS),
                ops.step_backward(fg, fp, ft, EPS)[1],
                *ops.jumprelu_l0_backward(fg, fgl, fp, ft, EPS),
                *ops.jumprelu_l0_backward(None, fgl, fp, ft, EPS),
            ]
        for r, f in zip(real, fake):
            assert (f.shape, f.dtype, f.device) == (r.shape, r.dtype, r.device)


def test_fake_kernels_check_inputs():
    """Tracing with bad inputs fails with the same clear error as eager."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        pre = mode.from_tensor(torch.zeros(4, 3))
        theta = mode.from_tensor(torch.zeros(5))
        with pytest.raises(ValueError, match="jumprelu_l0: threshold has 5 features but pre's last dimension is 3"):
            torch.ops.jumprelu_ext.jumprelu_l0(pre, theta, EPS)


# ---------------------------------------------------------------------------------------------
# torch.compile (two tests per device; keep it that way: each costs 10-30 s on 2 CPU cores).


@pytest.mark.slow
def test_compile_sae_forward_backward(device):
    """A small JumpReLU SAE step (encode with jumprelu_l0, decode, mse + λ·mean L0) compiled with
    fullgraph=True matches eager: loss, L0 and the gradients of all parameters incl. log θ."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(500)
    d, f, n, lam = 16, 48, 64, 0.05
    x = torch.randn(n, d, generator=g).to(device)
    w_enc = (torch.randn(d, f, generator=g) / d**0.5).to(device)
    params0 = {
        "w_enc": w_enc,
        "b_enc": torch.zeros(f, device=device),
        "w_dec": w_enc.t().contiguous(),
        "b_dec": torch.zeros(d, device=device),
        "log_theta": torch.full((f,), 0.15, device=device).log(),
    }

    # Backward inside the compiled region is not fullgraph-traceable; compile the forward and
    # let AOTAutograd compile the backward (which contains the jumprelu_l0_backward op).
    def forward(x, w_enc, b_enc, w_dec, b_dec, log_theta):
        pre = x @ w_enc + b_enc
        acts, l0 = jumprelu_ext.jumprelu_l0(pre, log_theta.exp(), EPS)
        recon = acts @ w_dec + b_dec
        return ((recon - x) ** 2).sum(-1).mean() + lam * l0.mean(), l0

    compiled = torch.compile(forward, fullgraph=True)

    def run(fwd):
        params = {k: v.clone().requires_grad_() for k, v in params0.items()}
        loss, l0 = fwd(x, **params)
        loss.backward()
        return loss.detach(), l0.detach(), {k: p.grad for k, p in params.items()}

    eager_loss, eager_l0, eager_grads = run(forward)
    loss, l0, got_grads = run(compiled)
    assert 0 < float(eager_l0.mean()) < f, "the test needs some but not all features active"
    assert eager_grads["log_theta"].abs().sum() > 0, "the test needs a non-zero θ-gradient"
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert_exact(l0, eager_l0, "l0")
    for name in params0:
        torch.testing.assert_close(
            got_grads[name], eager_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.slow
def test_compile_bare_ops(device):
    """fullgraph compile of all three ops and their backward (incl. mixed precision) matches eager
    bit for bit: the same kernels run, only the graph around them is compiled. step and
    jumprelu_l0 also add to fire-count buffers (inputs mutated inside the graph, through the
    .counted overloads), which must end as in eager."""
    torch._dynamo.reset()

    def fn(pre, theta, g, counts, step_counts):
        a = jumprelu_ext.jumprelu(pre, theta, EPS)
        s = jumprelu_ext.step(pre, theta, EPS, fire_counts=step_counts)
        acts, l0 = jumprelu_ext.jumprelu_l0(pre, theta, EPS, fire_counts=counts)
        return (a * g).sum() + (s * g).sum() + (acts * g).sum() + l0.sum(), a, s, acts, l0

    compiled = torch.compile(fn, fullgraph=True)
    pre, theta = make_inputs((24, 10), torch.bfloat16, torch.float32, device, seed=510, bandwidth=EPS)
    g = rand_like_grad(pre.shape, torch.bfloat16, device, 511)

    def run(f):
        p, t = pre.clone().requires_grad_(), theta.clone().requires_grad_()
        counts, step_counts = (torch.full((10,), 7, dtype=torch.int64, device=device) for _ in range(2))
        loss, *outs = f(p, t, g, counts, step_counts)
        loss.backward()
        return [*outs, counts, step_counts], p.grad, t.grad

    eager_outs, eager_gp, eager_gt = run(fn)
    outs, gp, gt = run(compiled)
    assert int(eager_outs[-2].sum()) > 7 * 10, "the test needs some features to fire"
    assert torch.equal(cpu(eager_outs[-2]) - 7, (cpu(eager_outs[2]) != 0).sum(0))
    names = ["jumprelu", "step", "acts", "l0", "fire_counts", "step fire_counts"]
    for got, expected, name in zip(outs, eager_outs, names):
        assert_exact(got, expected, name)
    assert_exact(gp, eager_gp, "grad_pre")
    assert cpu(eager_gt).abs().sum() > 0
    # Same backward kernels, but the compiled graph may sum the three θ-gradients in another order.
    torch.testing.assert_close(cpu(gt), cpu(eager_gt), rtol=1e-6, atol=1e-5)
