"""Values and both gradients of the compiled ops against jumprelu_ext.reference.

Every dtype pair (incl. fp32 θ with bf16/fp16/fp64 pre), 1-D/2-D/3-D pre, contiguous,
transposed, strided-slice and misaligned (storage offset 1) layouts, for jumprelu, step and jumprelu_l0 (with both outputs
in the loss and with only one). Forward values and grad_pre must be bit-exact (same fp32/fp64
arithmetic); grad_θ is checked to the per-dtype tolerance of conftest.THETA_GRAD_TOL.
"""

import pytest
import torch
from conftest import (
    DTYPE_PAIRS,
    LAYOUTS,
    assert_exact,
    assert_theta_grad_close,
    count_in_window,
    cpu,
    grads,
    make_inputs,
    rand_like_grad,
    reference_theta_grad,
    requires_compiled,
    requires_cuda,
    with_layout,
)

import jumprelu_ext
from jumprelu_ext import reference

pytestmark = requires_compiled

BANDWIDTH = 0.1
# Odd feature counts (scalar code paths) and multiples of 8 (16-byte vector paths for every dtype).
SHAPES = [(53,), (33, 19), (4, 9, 23), (16, 24), (3, 5, 32)]
SHAPE_LAYOUTS = [
    pytest.param(shape, layout, id=f"{'x'.join(map(str, shape))}-{layout}")
    for shape in SHAPES
    for layout in LAYOUTS
    if not (len(shape) == 1 and layout == "transposed")
]


def _setup(device, pre_dtype, theta_dtype, shape, layout):
    seed = sum(shape) * 31 + len(shape) * 7 + LAYOUTS.index(layout) + 100 * FLOAT_IDS[(pre_dtype, theta_dtype)]
    pre, theta = make_inputs(shape, pre_dtype, theta_dtype, device, seed, bandwidth=BANDWIDTH)
    # The test is only meaningful if the θ-gradient window and exact ties are populated.
    n_window = count_in_window(pre, theta, BANDWIDTH)
    assert n_window >= 0.15 * pre.numel(), f"only {n_window}/{pre.numel()} elements in the window"
    assert (cpu(pre).double() == cpu(theta).double()).any(), "no exact ties pre == θ"
    assert (cpu(pre).double() > cpu(theta).double()).any() and (cpu(pre).double() < cpu(theta).double()).any()
    pre = with_layout(pre, layout).requires_grad_()
    theta = theta.clone().requires_grad_()
    # Incoming gradients laid out like pre (non-contiguous where pre is).
    g = with_layout(rand_like_grad(shape, pre_dtype, device, seed + 1), layout)
    return pre, theta, g


FLOAT_IDS = {
    (torch.float32, torch.float32): 0,
    (torch.float64, torch.float64): 1,
    (torch.float16, torch.float16): 2,
    (torch.bfloat16, torch.bfloat16): 3,
    (torch.bfloat16, torch.float32): 4,
    (torch.float16, torch.float32): 5,
    (torch.float64, torch.float32): 6,
}


@pytest.mark.parametrize("pre_dtype,theta_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("shape,layout", SHAPE_LAYOUTS)
def test_jumprelu(device, pre_dtype, theta_dtype, shape, layout):
    pre, theta, g = _setup(device, pre_dtype, theta_dtype, shape, layout)
    acts = jumprelu_ext.jumprelu(pre, theta, BANDWIDTH)
    assert acts.device == pre.device
    assert_exact(acts, reference.jumprelu_forward(cpu(pre), cpu(theta)), "acts")
    assert acts.dtype == pre_dtype and acts.shape == pre.shape

    grad_pre, grad_theta = torch.autograd.grad(acts, (pre, theta), g)
    assert_exact(grad_pre, reference.input_grad(cpu(pre), cpu(theta), 1.0, cpu(g)), "grad_pre")
    expected, scale = reference_theta_grad(pre, theta, BANDWIDTH, grad_acts=g)
    assert cpu(expected).abs().sum() > 0
    assert_theta_grad_close(grad_theta, expected, scale, theta_dtype)


@pytest.mark.parametrize("pre_dtype,theta_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("shape,layout", SHAPE_LAYOUTS)
def test_step(device, pre_dtype, theta_dtype, shape, layout):
    pre, theta, g = _setup(device, pre_dtype, theta_dtype, shape, layout)
    out = jumprelu_ext.step(pre, theta, BANDWIDTH)
    assert_exact(out, reference.step_forward(cpu(pre), cpu(theta)), "step")
    assert set(cpu(out).double().unique().tolist()) == {0.0, 1.0}

    grad_pre, grad_theta = grads([out], [pre, theta], [g])
    assert_exact(grad_pre, torch.zeros_like(cpu(pre)), "grad_pre")
    expected, scale = reference_theta_grad(pre, theta, BANDWIDTH, grad_acts=g, step=True)
    assert cpu(expected).abs().sum() > 0
    assert_theta_grad_close(grad_theta, expected, scale, theta_dtype)


@pytest.mark.parametrize("use", ["both", "acts", "l0"])
@pytest.mark.parametrize("pre_dtype,theta_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("shape,layout", SHAPE_LAYOUTS)
def test_jumprelu_l0(device, pre_dtype, theta_dtype, shape, layout, use):
    pre, theta, g = _setup(device, pre_dtype, theta_dtype, shape, layout)
    acts, l0 = jumprelu_ext.jumprelu_l0(pre, theta, BANDWIDTH)
    assert_exact(acts, reference.jumprelu_forward(cpu(pre), cpu(theta)), "acts")
    assert_exact(l0, reference.l0_forward(cpu(pre), cpu(theta)), "l0")
    assert l0.shape == pre.shape[:-1] and l0.dtype == torch.float32
    # l0 is an exact count of active features, float32 whatever pre's dtype (docs/ops.md#l0-dtype).
    count = (cpu(pre).double() > cpu(theta).double()).sum(-1)
    assert torch.equal(cpu(l0).double(), count.double())

    g_l0 = rand_like_grad(pre.shape[:-1], torch.float32, device, 7) if use in ("both", "l0") else None
    g_acts = g if use in ("both", "acts") else None
    grad_pre, grad_theta = grads([acts, l0], [pre, theta], [g_acts, g_l0])

    expected_pre = (
        torch.zeros_like(cpu(pre)) if g_acts is None else reference.input_grad(cpu(pre), cpu(theta), 1.0, cpu(g_acts))
    )
    assert_exact(grad_pre, expected_pre, "grad_pre")
    expected, scale = reference_theta_grad(pre, theta, BANDWIDTH, grad_acts=g_acts, grad_l0=g_l0)
    assert cpu(expected).abs().sum() > 0
    assert_theta_grad_close(grad_theta, expected, scale, theta_dtype)


@pytest.mark.parametrize("pre_dtype,theta_dtype", DTYPE_PAIRS)
def test_jumprelu_l0_matches_separate_ops(device, pre_dtype, theta_dtype):
    """The fused op equals jumprelu + step.sum(-1), forward and θ-gradient (both compiled)."""
    pre, theta = make_inputs((41, 29), pre_dtype, theta_dtype, device, seed=11, bandwidth=BANDWIDTH)
    pre.requires_grad_()
    theta.requires_grad_()
    g_acts = rand_like_grad(pre.shape, pre_dtype, device, 12)
    # Representable in pre's dtype: the separate step's gradient is rounded to it.
    g_l0 = rand_like_grad(pre.shape[:-1], pre_dtype, device, 13).float()
    acts, l0 = jumprelu_ext.jumprelu_l0(pre, theta, BANDWIDTH)
    fused = grads([acts, l0], [pre, theta], [g_acts, g_l0])
    acts2 = jumprelu_ext.jumprelu(pre, theta, BANDWIDTH)
    steps = jumprelu_ext.step(pre, theta, BANDWIDTH)
    assert_exact(acts, acts2, "acts")
    assert_exact(l0, steps.float().sum(-1), "l0")
    separate = grads([acts2, steps], [pre, theta], [g_acts, g_l0.unsqueeze(-1).expand_as(steps)])
    assert_exact(fused[0], separate[0], "grad_pre")
    _, scale = reference_theta_grad(pre, theta, BANDWIDTH, grad_acts=g_acts, grad_l0=g_l0)
    # The separate path rounds two partial θ-gradients into θ's dtype before adding them.
    assert_theta_grad_close(fused[1], separate[1], scale, theta_dtype, rounded_terms=scale)


@pytest.mark.parametrize("pre_dtype,theta_dtype", DTYPE_PAIRS)
def test_non_contiguous_threshold(device, pre_dtype, theta_dtype):
    pre, theta = make_inputs((17, 12), pre_dtype, theta_dtype, device, seed=21, bandwidth=BANDWIDTH)
    strided_theta = torch.stack([theta, torch.full_like(theta, float("nan"))], -1)[:, 0]
    assert not strided_theta.is_contiguous() and torch.equal(strided_theta, theta)
    g = rand_like_grad(pre.shape, pre_dtype, device, 22)
    acts, l0 = jumprelu_ext.jumprelu_l0(pre, strided_theta.requires_grad_(), BANDWIDTH)
    assert_exact(acts, reference.jumprelu_forward(cpu(pre), cpu(theta)), "acts")
    assert_exact(l0, reference.l0_forward(cpu(pre), cpu(theta)), "l0")
    (grad_theta,) = torch.autograd.grad(acts, strided_theta, g)
    expected, scale = reference_theta_grad(pre, theta, BANDWIDTH, grad_acts=g)
    assert_theta_grad_close(grad_theta, expected, scale, theta_dtype)


@pytest.mark.parametrize("pre_dtype", [torch.float32, torch.bfloat16])
def test_default_bandwidth_is_1e_3(device, pre_dtype):
    """The public functions default to ε = 1e-3; window data built for that ε."""
    pre, theta = make_inputs((64, 16), pre_dtype, torch.float32, device, seed=31, bandwidth=1e-3)
    g = rand_like_grad(pre.shape, pre_dtype, device, 32)
    theta.requires_grad_()
    (got,) = torch.autograd.grad(jumprelu_ext.jumprelu(pre, theta), theta, g)
    expected, scale = reference_theta_grad(pre, theta, 1e-3, grad_acts=g)
    assert cpu(expected).abs().sum() > 0
    assert_theta_grad_close(got, expected, scale, torch.float32)
    other, _ = reference_theta_grad(pre, theta, 1e-2, grad_acts=g)
    assert not torch.allclose(cpu(got), other), "the default bandwidth should matter for this data"


@pytest.mark.parametrize("op", ["jumprelu", "step", "jumprelu_l0"])
def test_public_function_equals_torch_ops(device, op):
    """jumprelu_ext.<op>(pre, θ, ε) is torch.ops.jumprelu_ext.<op>(pre, θ, ε)."""
    pre, theta = make_inputs((9, 7), torch.float32, torch.float32, device, seed=41, bandwidth=BANDWIDTH)
    public = getattr(jumprelu_ext, op)(pre, theta, BANDWIDTH)
    direct = getattr(torch.ops.jumprelu_ext, op)(pre, theta, BANDWIDTH)
    public = public if isinstance(public, tuple) else (public,)
    direct = direct if isinstance(direct, tuple) else (direct,)
    assert len(public) == len(direct)
    for a, b in zip(public, direct):
        assert_exact(a, b, op)


@pytest.mark.parametrize(
    "shape",
    [(300, 64), (1000, 3), (4097, 8), (3, 40000), (2, 65, 33)],
    ids=["300x64", "1000x3", "4097x8", "3x40000-wide", "2x65x33"],
)
@pytest.mark.parametrize(
    "pre_dtype,theta_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
    ids=["f32", "bf16-f32theta"],
)
def test_many_row_chunks_and_wide_features(device, shape, pre_dtype, theta_dtype):
    """Row counts that need many (uneven) reduction chunks, and F beyond one parallel grain."""
    pre, theta = make_inputs(shape, pre_dtype, theta_dtype, device, seed=sum(shape), bandwidth=BANDWIDTH)
    pre.requires_grad_()
    theta.requires_grad_()
    g = rand_like_grad(shape, pre_dtype, device, 51)
    g_l0 = rand_like_grad(shape[:-1], torch.float32, device, 52)
    acts, l0 = jumprelu_ext.jumprelu_l0(pre, theta, BANDWIDTH)
    assert_exact(acts, reference.jumprelu_forward(cpu(pre), cpu(theta)), "acts")
    assert_exact(l0, reference.l0_forward(cpu(pre), cpu(theta)), "l0")
    grad_pre, grad_theta = grads([acts, l0], [pre, theta], [g, g_l0])
    assert_exact(grad_pre, reference.input_grad(cpu(pre), cpu(theta), 1.0, cpu(g)), "grad_pre")
    expected, scale = reference_theta_grad(pre, theta, BANDWIDTH, grad_acts=g, grad_l0=g_l0)
    assert_theta_grad_close(grad_theta, expected, scale, theta_dtype)


@pytest.mark.parametrize("pre_dtype,theta_dtype", DTYPE_PAIRS)
def test_expanded_pre(device, pre_dtype, theta_dtype):
    """A stride-0 (broadcast) pre, as from x.expand(): values and gradients as for its copy."""
    row, theta = make_inputs((1, 13), pre_dtype, theta_dtype, device, seed=61, bandwidth=BANDWIDTH)
    base = row.clone().requires_grad_()
    pre = base.expand(6, 13)
    assert pre.stride(0) == 0
    theta.requires_grad_()
    g = rand_like_grad((6, 13), pre_dtype, device, 62)
    acts = jumprelu_ext.jumprelu(pre, theta, BANDWIDTH)
    assert_exact(acts, reference.jumprelu_forward(cpu(pre).contiguous(), cpu(theta)), "acts")
    grad_base, grad_theta = torch.autograd.grad(acts, (base, theta), g)
    expected_pre = reference.input_grad(cpu(pre).contiguous(), cpu(theta), 1.0, cpu(g)).double().sum(0, keepdim=True)
    torch.testing.assert_close(cpu(grad_base).double(), expected_pre, rtol=1e-2, atol=1e-2)
    expected, scale = reference_theta_grad(pre.contiguous(), theta, BANDWIDTH, grad_acts=g)
    assert_theta_grad_close(grad_theta, expected, scale, theta_dtype)


@requires_cuda
@pytest.mark.parametrize(
    "pre_dtype,theta_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
    ids=["f32", "bf16-f32theta"],
)
def test_cuda_side_stream(pre_dtype, theta_dtype):
    """Kernels launch on the current stream: results computed on a side stream equal the
    default stream's (a kernel on the wrong stream races with the producer of its input)."""
    pre, theta = make_inputs((512, 96), pre_dtype, theta_dtype, "cuda", seed=71, bandwidth=BANDWIDTH)
    g = rand_like_grad(pre.shape, pre_dtype, "cuda", 72)
    g_l0 = rand_like_grad(pre.shape[:-1], torch.float32, "cuda", 73)

    def run():
        p = (pre * 1).requires_grad_()  # produced on the current stream
        t = theta.clone().requires_grad_()
        acts, l0 = jumprelu_ext.jumprelu_l0(p, t, BANDWIDTH)
        gp, gt = grads([acts, l0], [p, t], [g, g_l0])
        return acts, l0, gp, gt

    expected = run()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run()
    side.synchronize()
    for a, b, name in zip(got, expected, ["acts", "l0", "grad_pre", "grad_threshold"]):
        assert_exact(a, b, name)
