"""The θ-gradient reduction is deterministic: bitwise identical run to run (CPU and CUDA) and,
on CPU, across torch.set_num_threads values (the row chunking depends on the row count only).

Sizes have several hundred rows so the chunked reduction really has many chunks, and the
incoming gradients span many orders of magnitude so that a different summation order would
change the bits (checked for the data: a reversed-order sum differs).
"""

import pytest
import torch
from conftest import make_inputs, requires_compiled

import jumprelu_ext

pytestmark = requires_compiled

EPS = 0.1
SHAPES = [
    pytest.param((300, 64), id="300x64"),
    pytest.param((5, 97, 48), id="5x97x48"),
    pytest.param((1000, 3), id="1000x3"),
]


def _data(device, shape, pre_dtype, theta_dtype, seed):
    pre, theta = make_inputs(shape, pre_dtype, theta_dtype, device, seed, bandwidth=EPS, window_frac=0.8)
    g = torch.Generator().manual_seed(seed + 1)
    mantissa = torch.randn(shape, generator=g, dtype=torch.float64)
    scale = 10.0 ** torch.randint(-3, 4, shape, generator=g).double()
    grad = (mantissa * scale).to(pre_dtype).to(device)
    grad_l0 = (torch.randn(shape[:-1], generator=g, dtype=torch.float64) * 100).float().to(device)
    return pre, theta, grad, grad_l0


def _theta_grads(pre, theta, grad, grad_l0):
    """θ-gradients of the three ops through autograd, and the direct backward ops."""
    ops = torch.ops.jumprelu_ext
    t = theta.clone().requires_grad_()
    acts, l0 = jumprelu_ext.jumprelu_l0(pre, t, EPS)
    (via_autograd,) = torch.autograd.grad([acts, l0], t, [grad, grad_l0])
    return [
        via_autograd,
        ops.jumprelu_backward(grad, pre, theta, EPS)[1],
        ops.step_backward(grad, pre, theta, EPS)[1],
        ops.jumprelu_l0_backward(grad, grad_l0, pre, theta, EPS)[1],
        ops.jumprelu_l0_backward(None, grad_l0, pre, theta, EPS)[1],
    ]


def _bits_equal(a, b):
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.cpu().view(-1), b.cpu().view(-1))
        and bool((a.cpu().contiguous().view(torch.uint8) == b.cpu().contiguous().view(torch.uint8)).all())
    )


def _assert_order_matters(pre, theta, grad):
    """Sanity: for this data the fp32 sum in reversed row order gives other bits for some θ."""
    x = pre.cpu().float().reshape(-1, pre.shape[-1])
    t = theta.cpu().float()
    terms = torch.where(((x - t) / EPS).abs() < 0.5, t * grad.cpu().float().reshape(x.shape), torch.zeros_like(x))
    forward = torch.zeros(x.shape[1])
    backward = torch.zeros(x.shape[1])
    for r in range(x.shape[0]):
        forward += terms[r]
        backward += terms[x.shape[0] - 1 - r]
    assert not torch.equal(forward, backward), "the data does not make the summation order visible"


@pytest.mark.parametrize(
    "pre_dtype,theta_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)],
    ids=["f32", "bf16-f32theta", "f64"],
)
@pytest.mark.parametrize("shape", SHAPES)
def test_run_to_run_bitwise(device, shape, pre_dtype, theta_dtype):
    pre, theta, grad, grad_l0 = _data(device, shape, pre_dtype, theta_dtype, seed=600)
    if pre_dtype == torch.float32:
        _assert_order_matters(pre, theta, grad)
    first = _theta_grads(pre, theta, grad, grad_l0)
    for _ in range(3):
        again = _theta_grads(pre, theta, grad, grad_l0)
        for a, b in zip(first, again):
            assert _bits_equal(a, b)
    assert first[0].abs().sum() > 0


@pytest.mark.parametrize(
    "pre_dtype,theta_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
    ids=["f32", "bf16-f32theta"],
)
@pytest.mark.parametrize("shape", SHAPES + [pytest.param((4097, 8), id="4097x8")])
def test_bitwise_across_thread_counts(shape, pre_dtype, theta_dtype):
    pre, theta, grad, grad_l0 = _data("cpu", shape, pre_dtype, theta_dtype, seed=610)
    if pre_dtype == torch.float32:
        _assert_order_matters(pre, theta, grad)
    original = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2, 3, 4, 7):
            torch.set_num_threads(n)
            assert torch.get_num_threads() == n
            results[n] = _theta_grads(pre, theta, grad, grad_l0)
    finally:
        torch.set_num_threads(original)
    assert torch.get_num_threads() == original
    for n, res in results.items():
        for i, (a, b) in enumerate(zip(results[1], res)):
            assert _bits_equal(a, b), f"θ-gradient #{i} differs between 1 and {n} threads"


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_identical_across_thread_counts(shape):
    pre, theta, _, _ = _data("cpu", shape, torch.float32, torch.float32, seed=620)
    original = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = jumprelu_ext.jumprelu_l0(pre, theta, EPS)
        torch.set_num_threads(max(2, original))
        many = jumprelu_ext.jumprelu_l0(pre, theta, EPS)
    finally:
        torch.set_num_threads(original)
    assert all(_bits_equal(a, b) for a, b in zip(one, many))
