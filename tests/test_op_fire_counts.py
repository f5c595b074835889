"""Per-feature fire counts from the forward pass (docs/ops.md#fire-counts): given an int64 [F]
``fire_counts`` (the ops' ``.counted`` overloads), every forward op adds to it, per feature, the
rows where its output is non-zero.

The oracle is ``(reference output != 0)`` summed over the rows; counts are exact integers, so
every comparison is exact, and they must not change any other output of the op.
"""

import pytest
import torch
from conftest import (
    DTYPE_PAIRS,
    IMPLS,
    assert_exact,
    cpu,
    make_inputs,
    rand_like_grad,
    requires_compiled,
    requires_cuda,
    with_layout,
)

import jumprelu_ext
from jumprelu_ext import reference

EPS = 0.1
OPS = ["jumprelu", "step", "jumprelu_l0"]
ops = torch.ops.jumprelu_ext
# F = 1 and F not a multiple of any vector width or block size (CUDA: 4/8 columns per thread,
# 256 threads), a 3-D batch, and a width whose blocks span several rows per block (F < 256).
SHAPES = [(37, 1), (29, 45), (3, 5, 70), (9, 2053), (40, 4104)]


def _first(out):
    """The op's elementwise output (jumprelu_l0 returns (acts, l0))."""
    return out[0] if isinstance(out, tuple) else out


def _reference_counts(op, pre, theta):
    return reference.fire_counts_of(_first(getattr(reference, op)(cpu(pre), cpu(theta), EPS)))


def _start(features, device, seed=0):
    """A counts buffer that does not start at zero: the op adds to it."""
    return torch.randint(0, 1000, (features,), generator=torch.Generator().manual_seed(seed)).to(device)


@requires_compiled
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pre_dtype,theta_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("op", OPS)
def test_counts_match_reference_and_outputs_unchanged(device, op, pre_dtype, theta_dtype, shape):
    pre, theta = make_inputs(shape, pre_dtype, theta_dtype, device, seed=1000 + shape[-1])
    start = _start(shape[-1], device)
    counts = start.clone()
    counted = getattr(jumprelu_ext, op)(pre, theta, EPS, fire_counts=counts)
    plain = getattr(jumprelu_ext, op)(pre, theta, EPS)
    expected = _reference_counts(op, pre, theta)
    assert 0 < int(expected.sum()) < pre.numel(), "the test needs some but not all outputs non-zero"
    assert_exact(counts, start + expected.to(device), "fire_counts")
    # The definition, on the kernel's own output.
    assert_exact(counts - start, reference.fire_counts_of(_first(counted)), "fire_counts vs own output")
    for got, want in zip(
        counted if isinstance(counted, tuple) else [counted], plain if isinstance(plain, tuple) else [plain]
    ):
        assert_exact(got, want, f"{op} output with counting")


@requires_compiled
@pytest.mark.parametrize("layout", ["transposed", "sliced", "offset"])
def test_any_layout_of_pre(device, layout):
    pre, theta = make_inputs((33, 24), torch.float32, torch.float32, device, seed=1010)
    counts = torch.zeros(24, dtype=torch.int64, device=device)
    jumprelu_ext.jumprelu_l0(with_layout(pre, layout), theta, EPS, fire_counts=counts)
    assert_exact(counts, _reference_counts("jumprelu_l0", pre, theta).to(device), layout)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_special_values(device, impl, op):
    """Non-finite θ and pre, rows of zeros and pre == 0 with θ < 0: the count follows the output.
    NaN outputs (NaN pre, or ±inf pre times 0) count, as ``acts != 0`` does; a 0 output does not
    even where H fires (pre = 0 > θ)."""
    nan, inf = float("nan"), float("inf")
    theta = torch.tensor([0.5, inf, -inf, nan, -1.0, 0.0, 0.5, 0.5], device=device)
    pre = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, nan, -inf],
            [0.0, inf, -2.0, nan, -0.5, 1e-30, inf, 0.2],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # a row of zeros
            [-0.0, -inf, nan, inf, 2.0, -1e-30, 0.6, 0.5],
        ],
        device=device,
    )
    counts = torch.zeros(8, dtype=torch.int64, device=device)
    out = _first(getattr(impl, op)(pre, theta, EPS, fire_counts=counts))
    assert_exact(counts, reference.fire_counts_of(out), "fire_counts vs own output")
    assert_exact(counts, _reference_counts(op, pre, theta).to(device), "fire_counts vs reference")
    if op != "step":  # hand-checked: NaN outputs count, zero outputs do not
        assert cpu(counts).tolist() == [1, 2, 3, 2, 2, 1, 3, 1]


@pytest.mark.parametrize("impl", IMPLS)
def test_two_calls_accumulate(device, impl):
    counts = torch.zeros(45, dtype=torch.int64, device=device)
    expected = torch.zeros(45, dtype=torch.int64)
    for seed in (1020, 1021):
        pre, theta = make_inputs((17, 45), torch.float32, torch.float32, device, seed=seed)
        impl.jumprelu_l0(pre, theta, EPS, fire_counts=counts)
        expected += _reference_counts("jumprelu_l0", pre, theta)
    assert_exact(counts, expected.to(device), "two calls")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(0, 6), (4, 0), (0,)], ids=["no-rows", "no-features", "empty-1d"])
def test_empty_inputs_add_nothing(device, impl, shape):
    pre = torch.empty(shape, device=device)
    theta = torch.empty(shape[-1], device=device)
    counts = _start(shape[-1], device)
    before = counts.clone()
    impl.jumprelu_l0(pre, theta, EPS, fire_counts=counts)
    assert_exact(counts, before, "empty input")


@requires_compiled
def test_bitwise_identical_across_thread_counts():
    """Rows are split among threads (several row chunks at this size); integer counts are exact,
    so 1 and 2 threads give the same bits."""
    pre, theta = make_inputs((600, 700), torch.float32, torch.float32, "cpu", seed=1030)
    original = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            counts = torch.zeros(700, dtype=torch.int64)
            jumprelu_ext.jumprelu_l0(pre, theta, EPS, fire_counts=counts)
            results.append(counts)
    finally:
        torch.set_num_threads(original)
    assert torch.equal(results[0], results[1])
    assert_exact(results[0], _reference_counts("jumprelu_l0", pre, theta), "1 thread")


@requires_compiled
def test_gradients_unchanged_when_counting(device):
    pre, theta = make_inputs((21, 30), torch.float32, torch.float32, device, seed=1040)
    g = rand_like_grad(pre.shape, torch.float32, device, 1041)

    def grads(counts):
        p, t = pre.clone().requires_grad_(), theta.clone().requires_grad_()
        acts, l0 = jumprelu_ext.jumprelu_l0(p, t, EPS, fire_counts=counts)
        ((acts * g).sum() + l0.sum()).backward()
        return p.grad, t.grad

    counted = grads(torch.zeros(30, dtype=torch.int64, device=device))
    for got, want, name in zip(counted, grads(None), ["grad_pre", "grad_threshold"]):
        assert_exact(got, want, name)


@requires_compiled
@pytest.mark.parametrize("op", OPS)
def test_plain_ops_stay_functional(op):
    """Only the .counted overloads mutate: the plain ops keep their schema (and register_autograd)."""
    assert not getattr(ops, op).default._schema.is_mutable
    counted = getattr(ops, op).counted._schema
    assert counted.is_mutable and [a.name for a in counted.arguments][-1] == "fire_counts"


BAD_COUNTS = [
    (lambda d: torch.zeros(6, dtype=torch.int32, device=d), TypeError, "fire_counts must be int64, got"),
    (lambda d: torch.zeros(6, device=d), TypeError, "fire_counts must be int64, got"),
    (lambda d: torch.zeros(7, dtype=torch.int64, device=d), ValueError, r"fire_counts must have shape \[6\]"),
    (lambda d: torch.zeros(1, 6, dtype=torch.int64, device=d), ValueError, r"fire_counts must have shape \[6\]"),
    (lambda d: torch.zeros(12, dtype=torch.int64, device=d)[::2], ValueError, "fire_counts must be contiguous"),
    (lambda d: torch.zeros(6, dtype=torch.int64, device="meta"), ValueError, "fire_counts is on meta but pre is on"),
]
BAD_IDS = ["int32", "float", "too-long", "2-d", "strided", "other-device"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("make,error,message", BAD_COUNTS, ids=BAD_IDS)
@pytest.mark.parametrize("op", OPS)
def test_bad_counts_rejected(device, impl, op, make, error, message):
    pre, theta = make_inputs((5, 6), torch.float32, torch.float32, device, seed=1050)
    with pytest.raises(error, match=f"^{op}: {message}"):
        getattr(impl, op)(pre, theta, EPS, fire_counts=make(device))
    with pytest.raises(TypeError, match=f"^{op}: fire_counts must be a tensor or None, got list"):
        getattr(impl, op)(pre, theta, EPS, fire_counts=[0] * 6)


@requires_compiled
@pytest.mark.parametrize("make,error,message", BAD_COUNTS[:-1], ids=BAD_IDS[:-1])
def test_bad_counts_rejected_by_the_compiled_op(device, make, error, message):
    """Direct torch.ops calls skip the Python checks: the C++ op says the same. (A meta buffer
    sends the call to the fake kernel, which runs the Python checks: tested above.)"""
    pre, theta = make_inputs((5, 6), torch.float32, torch.float32, device, seed=1050)
    with pytest.raises(RuntimeError, match=f"jumprelu_l0: {message}"):
        ops.jumprelu_l0.counted(pre, theta, EPS, False, make(device))


@requires_cuda
@requires_compiled
def test_counts_on_another_device_rejected_by_the_compiled_op():
    pre, theta = make_inputs((5, 6), torch.float32, torch.float32, "cuda", seed=1050)
    with pytest.raises(RuntimeError, match="jumprelu_l0: fire_counts is on cpu but pre is on cuda"):
        ops.jumprelu_l0.counted(pre, theta, EPS, False, torch.zeros(6, dtype=torch.int64))


@requires_compiled
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck_with_counts(device, op, requires_grad):
    specs = [
        ((8, 6), torch.float32, torch.float32),
        ((2, 5, 6), torch.bfloat16, torch.float32),
        ((7, 6), torch.float16, torch.float16),
        ((6,), torch.float64, torch.float64),
        ((0, 4), torch.float32, torch.float32),
    ]
    for i, (shape, pre_dtype, theta_dtype) in enumerate(specs):
        pre, theta = make_inputs(shape, pre_dtype, theta_dtype, device, seed=1060 + i, bandwidth=EPS)
        counts = torch.zeros(shape[-1], dtype=torch.int64, device=device)
        args = (pre.requires_grad_(requires_grad), theta.requires_grad_(requires_grad), EPS, False, counts)
        torch.library.opcheck(getattr(ops, op).counted, args)
