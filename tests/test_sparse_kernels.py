"""The sparse step's kernels (csrc/*/select*, sparse_matmul*; contract in csrc/sparse_kernels.h and
docs/ops.md#the-sparse-step), called through the ops directly and held to plain dense torch:

- sparse_encode: the support (active, in the window by the ops' rule, or a NaN value), its values
  pre·H(pre − θ), flags, l0 and fire counts are exactly those of the dense computation, for every
  dtype pair, any chunk_rows and any thread count; empty rows, all-firing rows, rows = 0, NaN/inf;
- sparse_decode / sparse_decode_backward / sparse_encode_backward against dense matmuls (float
  tolerance: the sums run in another order), and bitwise equal for any thread count.

pre is made exact whatever the matmul's summation order: either x = I (pre = W_enc, each output a
single product) or small dyadic x, W_enc, b_enc whose sums are exact in every dtype.
"""

import pytest
import torch
from conftest import (
    DEVICES,
    DTYPE_PAIRS,
    assert_exact,
    assert_theta_grad_close,
    cpu,
    gen,
    make_inputs,
    reference_theta_grad,
    requires_compiled,
)

import jumprelu_ext.ops  # noqa: F401  (registers torch.ops.jumprelu_ext.*)

ops = torch.ops.jumprelu_ext
pytestmark = requires_compiled

ACTIVE, WINDOW = 1, 2
# (rtol, atol) for products summed in another order than the dense matmul's.
MATMUL_TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12)}


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dense_support(pre, theta, bandwidth):
    """The dense semantics per element: (in_support, values, flags) in the compute dtype.
    The window is K((pre − θ)/ε) computed with a division, as jumprelu_ext.reference does."""
    cd = compute_dtype(pre.dtype)
    x, t = cpu(pre).to(cd), cpu(theta).to(cd)
    active = x > t
    u = (x - t) / torch.full((), bandwidth, dtype=cd)
    window = (u > -0.5) & (u < 0.5)
    values = x * active.to(cd)  # x·H: NaN for NaN (and for −inf: −inf·0)
    in_support = active | window | values.isnan()
    flags = active.to(torch.uint8) * ACTIVE + window.to(torch.uint8) * WINDOW
    return in_support, values, flags


def expected_csr(pre, theta, bandwidth):
    in_support, values, flags = dense_support(pre, theta, bandwidth)
    offsets = torch.zeros(pre.shape[0] + 1, dtype=torch.int64)
    offsets[1:] = in_support.sum(1).cumsum(0)
    return offsets, in_support.nonzero()[:, 1], values[in_support], flags[in_support]


def to_dense(offsets, indices, values, features):
    rows = offsets.numel() - 1
    entry_rows = torch.repeat_interleave(torch.arange(rows), offsets.diff())
    out = torch.zeros(rows, features, dtype=values.dtype)
    out[entry_rows, indices] = values
    return out


def identity_inputs(pre):
    """(x, W_enc, b_enc) with addmm(b_enc, x, W_enc) == pre exactly: x = I, W_enc = pre."""
    rows = pre.shape[0]
    x = torch.eye(rows, dtype=pre.dtype, device=pre.device)
    return x, pre.clone(), torch.zeros(pre.shape[1], dtype=pre.dtype, device=pre.device)


def dyadic_inputs(rows, d, features, dtype, theta_dtype, device, seed):
    """Small dyadic x, W_enc, b_enc, θ: pre's partial sums are exact in every dtype (multiples of
    1/8 below 2^8), pre − θ is exact, and with ε = 1/4 it lands on the window's edges (±1/8)."""
    g = gen(seed)
    x = torch.randint(-2, 3, (rows, d), generator=g).to(dtype)
    W = (torch.randint(-8, 9, (d, features), generator=g) / 8).to(dtype)
    b = (torch.randint(-8, 9, (features,), generator=g) / 8).to(dtype)
    theta = (torch.randint(0, 33, (features,), generator=g) / 16).to(theta_dtype)
    return x.to(device), W.to(device), b.to(device), theta.to(device)


def encode(x, W, b, theta, bandwidth, chunk_rows=0, fire_counts=None, ste_to_input=False):
    if fire_counts is None:
        return ops.sparse_encode(x, W, b, theta, bandwidth, ste_to_input, chunk_rows)
    return ops.sparse_encode.counted(x, W, b, theta, bandwidth, ste_to_input, chunk_rows, fire_counts)


def check_encode(x, W, b, theta, bandwidth, chunk_rows=0):
    """Runs the counted op against the dense ops on the same pre; returns its outputs."""
    pre = torch.addmm(b, x, W)
    start = torch.randint(0, 5, (W.shape[1],), generator=gen(1), dtype=torch.int64).to(x.device)
    fire_counts = start.clone()
    out = encode(x, W, b, theta, bandwidth, chunk_rows, fire_counts)
    offsets, indices, values, flags, l0 = out
    want_offsets, want_indices, want_values, want_flags = expected_csr(pre, theta, bandwidth)
    assert_exact(offsets, want_offsets, "offsets")
    assert_exact(indices, want_indices, "indices")
    assert_exact(values, want_values, "values")
    assert_exact(flags, want_flags, "flags")
    dense_counts = start.clone()
    _, dense_l0 = ops.jumprelu_l0.counted(pre, theta, bandwidth, False, dense_counts)
    assert_exact(l0, dense_l0, "l0")
    assert_exact(fire_counts, dense_counts, "fire_counts")
    return out, fire_counts - start


@pytest.fixture
def threads():
    """Sets the thread count for the test, restoring it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# ---------------------------------------------------------------- sparse_encode (select)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pre_dtype,theta_dtype", DTYPE_PAIRS)
def test_encode_random_pre_near_the_window(device, pre_dtype, theta_dtype):
    """pre spread around θ ± ε (window edges, ties), F not a multiple of any vector or mask block."""
    pre, theta = make_inputs((21, 203), pre_dtype, theta_dtype, device, seed=3, bandwidth=0.1)
    check_encode(*identity_inputs(pre), theta, 0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pre_dtype,theta_dtype", DTYPE_PAIRS)
def test_encode_chunk_rows_and_threads_give_identical_outputs(device, pre_dtype, theta_dtype, threads):
    x, W, b, theta = dyadic_inputs(37, 8, 4104, pre_dtype, theta_dtype, device, seed=5)
    first, first_counts = check_encode(x, W, b, theta, 0.25, chunk_rows=0)
    for chunk_rows, n in ((1, 2), (3, 1), (0, 2), (5, 4)):
        threads(n)
        out, counts = check_encode(x, W, b, theta, 0.25, chunk_rows=chunk_rows)
        for name, got, want in zip(("offsets", "indices", "values", "flags", "l0"), out, first):
            assert_exact(got, want, f"{name} (chunk_rows={chunk_rows}, threads={n})")
        assert_exact(counts, first_counts, "fire counts")
    assert (first[3] == WINDOW).any() and (first[3] == ACTIVE).any() and (first[3] == 3).any()


@pytest.mark.parametrize("device", DEVICES)
def test_encode_empty_and_all_firing_rows(device):
    g = gen(7)
    features = 131
    theta = (0.5 + torch.rand(features, generator=g)).to(device)
    pre = torch.randn(9, features, generator=g).to(device)
    pre[0] = -3.0  # nothing active or near θ: an empty row
    pre[2] = 5.0  # every feature fires
    pre[5] = -3.0
    pre[8] = theta  # ties: every feature in the window, none active
    (offsets, indices, values, flags, l0), counts = check_encode(*identity_inputs(pre), theta, 0.2)
    counts_per_row = offsets.diff().cpu()
    assert counts_per_row[0] == 0 and counts_per_row[5] == 0
    assert counts_per_row[2] == features and counts_per_row[8] == features
    assert l0[2] == features and l0[8] == 0
    row8 = slice(int(offsets[8]), int(offsets[9]))
    assert (flags[row8] == WINDOW).all() and (values[row8] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_encode_every_entry_fires(device):
    """A chunk whose support is everything: nnz = rows·F, across several row blocks and (F above
    the CPU's 2,048-feature tiles) several tiles."""
    x, W, b, _ = dyadic_inputs(70, 4, 4200, torch.float32, torch.float32, device, seed=2)
    theta = torch.full((4200,), -100.0, device=device)
    (offsets, *_), counts = check_encode(x, W, b, theta, 0.25, chunk_rows=33)
    assert int(offsets[-1]) == 70 * 4200


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("features", [0, 1, 70])
def test_encode_no_rows_and_no_features(device, features):
    x = torch.zeros(0, 3, device=device)
    W = torch.ones(3, features, device=device)
    b = torch.zeros(features, device=device)
    theta = torch.full((features,), 0.5, device=device)
    fire_counts = torch.arange(features, device=device)
    offsets, indices, values, flags, l0 = encode(x, W, b, theta, 0.1, 0, fire_counts)
    assert offsets.tolist() == [0] and indices.numel() == values.numel() == flags.numel() == l0.numel() == 0
    assert values.dtype == torch.float32 and flags.dtype == torch.uint8
    assert fire_counts.tolist() == list(range(features))
    if features == 0:  # rows but no features: every row empty
        x = torch.ones(4, 3, device=device)
        offsets, indices, _, _, l0 = encode(x, W, b, theta, 0.1, 0, fire_counts)
        assert offsets.tolist() == [0] * 5 and indices.numel() == 0 and l0.tolist() == [0.0] * 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_encode_nan_and_inf(device, dtype):
    """NaN in pre: in the support, value NaN, no flags, fired (NaN != 0), not in l0. −inf: x·H is
    −inf·0 = NaN in the dense ops, so −inf is kept the same way. +inf > θ: active, value inf."""
    g = gen(4)
    features = 77
    pre = torch.randn(6, features, generator=g, dtype=torch.float64).to(dtype).to(device)
    theta = (0.5 + torch.rand(features, generator=g)).to(dtype).to(device)
    x, W, b = identity_inputs(pre)
    x[3, 3] = float("nan")  # row 3 all NaN
    b[10] = float("nan")  # column 10 all NaN
    b[20] = float("-inf")
    b[30] = float("inf")
    (offsets, indices, values, flags, l0), counts = check_encode(x, W, b, theta, 0.1)
    row3 = slice(int(offsets[3]), int(offsets[4]))
    assert indices[row3].tolist() == list(range(features))
    assert values[row3].isnan().all() and (flags[row3] == 0).all() and l0[3] == 0
    dense = to_dense(cpu(offsets), cpu(indices), cpu(values), features)
    assert dense[:, 10].isnan().all() and dense[:, 20].isnan().all()
    assert (dense[[0, 1, 2, 4, 5], 30] == float("inf")).all()
    assert counts[10] == counts[20] == counts[30] == 6


# ---------------------------------------------------------------- sparse_decode and its backward


def random_support(rows, features, device, seed, dtype=torch.float32):
    """A support from the encoder on random data (some rows empty), with random values."""
    g = gen(seed)
    pre = torch.randn(rows, features, generator=g, dtype=torch.float64)
    pre[::4] = -5.0  # empty rows
    theta = 1.5 + 0.2 * torch.rand(features, generator=g, dtype=torch.float64)
    x, W, b = identity_inputs(pre.to(dtype).to(device))
    offsets, indices, values, flags, _ = encode(x, W, b, theta.to(dtype).to(device), 0.3)
    values = torch.randn(values.shape, generator=g, dtype=torch.float64).to(values.dtype).to(device)
    return offsets, indices, values, flags


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("w_dtype", [None, torch.bfloat16])
def test_decode_and_its_backward_match_dense_matmuls(device, dtype, w_dtype):
    rows, features, d = 29, 300, 19
    offsets, indices, values, _ = random_support(rows, features, device, seed=8, dtype=dtype)
    assert 0 < indices.numel() < rows * features
    g = gen(9)
    W_dec = torch.randn(features, d, generator=g, dtype=dtype).to(w_dtype or dtype).to(device)
    grad_out = torch.randn(rows, d, generator=g, dtype=dtype).to(device)
    acts = to_dense(cpu(offsets), cpu(indices), cpu(values), features)
    W = cpu(W_dec).to(dtype)
    rtol, atol = MATMUL_TOL[dtype]
    out = ops.sparse_decode(offsets, indices, values, W_dec)
    assert out.dtype == dtype
    torch.testing.assert_close(cpu(out), acts @ W, rtol=rtol, atol=atol)
    assert (cpu(out)[::4] == 0).all()  # rows without entries
    grad_values, grad_W = ops.sparse_decode_backward(grad_out, offsets, indices, values, W_dec, True, True)
    entry_rows = torch.repeat_interleave(torch.arange(rows), cpu(offsets).diff())
    want_values = (cpu(grad_out) @ W.T)[entry_rows, cpu(indices)]
    torch.testing.assert_close(cpu(grad_values), want_values, rtol=rtol, atol=atol)
    assert grad_W.dtype == W_dec.dtype
    want_W = (acts.T @ cpu(grad_out)).to(W_dec.dtype)
    if w_dtype is None:
        torch.testing.assert_close(cpu(grad_W), want_W, rtol=rtol, atol=atol)
    else:  # rounded into bf16 from slightly different fp32 sums: one bf16 ulp apart at most
        torch.testing.assert_close(cpu(grad_W), want_W, rtol=2**-7, atol=1e-5)
    none_values, none_W = ops.sparse_decode_backward(grad_out, offsets, indices, values, W_dec, False, False)
    assert none_values.numel() == 0 and none_W.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_decode_without_entries_and_malformed_csr(device):
    W_dec = torch.randn(10, 4, device=device)
    offsets = torch.zeros(4, dtype=torch.int64, device=device)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    out = ops.sparse_decode(offsets, empty, torch.zeros(0, device=device), W_dec)
    assert out.shape == (3, 4) and (out == 0).all()
    grad_values, grad_W = ops.sparse_decode_backward(
        torch.ones(3, 4, device=device), offsets, empty, torch.zeros(0, device=device), W_dec
    )
    assert grad_values.numel() == 0 and (grad_W == 0).all()
    if device == "cpu":  # the CPU kernels check the CSR they index with
        one = torch.ones(1, device=device)
        with pytest.raises(RuntimeError, match="out of range"):
            ops.sparse_decode(torch.tensor([0, 1]), torch.tensor([10]), one, W_dec)
        with pytest.raises(RuntimeError, match="non-decreasing"):
            ops.sparse_decode(torch.tensor([0, 1, 0]), torch.tensor([1]), one, W_dec)
        with pytest.raises(RuntimeError, match="must be nnz"):
            ops.sparse_decode(torch.tensor([0, 2]), torch.tensor([1]), one, W_dec)
        with pytest.raises(RuntimeError, match="must be nnz"):  # an entry no row owns
            ops.sparse_decode_backward(
                torch.ones(1, 4), torch.tensor([0, 0]), torch.tensor([1]), one, W_dec, True, False
            )
        with pytest.raises(RuntimeError, match="offsets.0. must be 0"):
            ops.sparse_decode(torch.tensor([1, 1]), torch.tensor([1]), one, W_dec)


# ---------------------------------------------------------------- sparse_encode_backward


def dense_encode_backward(grad_values, grad_l0, x, W, theta, pre, offsets, indices, bandwidth, ste):
    """The same gradients from dense [rows, F] tensors (in the compute dtype, on CPU)."""
    cd = compute_dtype(x.dtype)
    features = W.shape[1]
    _, _, flags = dense_support(pre, theta, bandwidth)
    active = (flags & ACTIVE) != 0
    window = (flags & WINDOW) != 0
    G = to_dense(cpu(offsets), cpu(indices), cpu(grad_values).to(cd), features)
    t = cpu(theta).to(cd)
    term = window.to(cd) * (t * G + cpu(grad_l0).to(cd).unsqueeze(1))
    eps = torch.full((), bandwidth, dtype=cd)
    grad_pre = active.to(cd) * G
    if ste:
        grad_pre = grad_pre + term / eps
    xc, Wc = cpu(x).to(cd), cpu(W).to(cd)
    return grad_pre @ Wc.T, xc.T @ grad_pre, grad_pre.sum(0), G


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ste_to_input", [False, True])
def test_encode_backward_matches_dense(device, dtype, ste_to_input):
    bandwidth = 0.25
    x, W, b, theta = dyadic_inputs(31, 12, 250, dtype, torch.float32, device, seed=12)
    pre = torch.addmm(b, x, W)
    offsets, indices, values, flags, _ = encode(x, W, b, theta, bandwidth)
    g = gen(13)
    grad_values = torch.randn(values.shape, generator=g, dtype=dtype).to(device)
    grad_l0 = torch.randn(31, generator=g).to(device)
    out = ops.sparse_encode_backward(
        grad_values, grad_l0, x, W, theta, offsets, indices, flags, bandwidth, ste_to_input, True, True, True, True
    )
    grad_x, grad_W, grad_b, grad_theta = (cpu(t) for t in out)
    want_x, want_W, want_b, G = dense_encode_backward(
        grad_values, grad_l0, x, W, theta, pre, offsets, indices, bandwidth, ste_to_input
    )
    rtol, atol = MATMUL_TOL[dtype]
    for name, got, want in (("x", grad_x, want_x), ("W_enc", grad_W, want_W), ("b_enc", grad_b, want_b)):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got, want.to(dtype), rtol=rtol, atol=atol * max(1.0, want.abs().max()), msg=name)
    want_theta, scale = reference_theta_grad(pre, theta, bandwidth, grad_acts=G.to(dtype), grad_l0=grad_l0)
    assert_theta_grad_close(grad_theta, want_theta, scale, torch.float32)
    # Only some gradients asked for (and only one of the two incoming gradients given).
    out = ops.sparse_encode_backward(
        None, grad_l0, x, W, theta, offsets, indices, flags, bandwidth, ste_to_input, False, False, False, True
    )
    assert out[0].numel() == out[1].numel() == out[2].numel() == 0
    want_theta, scale = reference_theta_grad(pre, theta, bandwidth, grad_l0=grad_l0)
    assert_theta_grad_close(out[3], want_theta, scale, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_bitwise_over_thread_counts(device, threads):
    """θ's gradient, ∂W_enc, ∂b_enc, ∂x, ∂f and ∂W_dec: the same bits with 1, 2 or 4 threads."""
    rows, d, features, bandwidth = 64, 24, 3000, 0.4
    g = gen(21)
    x = torch.randn(rows, d, generator=g).to(device)
    W = (0.5 * torch.randn(d, features, generator=g)).to(device)
    b = torch.zeros(features, device=device)
    theta = (0.8 + 0.5 * torch.rand(features, generator=g)).to(device)
    offsets, indices, values, flags, _ = encode(x, W, b, theta, bandwidth)
    assert indices.numel() > features  # features with several entries each
    grad_values = torch.randn(values.shape, generator=g).to(device)
    grad_l0 = torch.randn(rows, generator=g).to(device)
    W_dec = torch.randn(features, d, generator=g).to(device)
    grad_out = torch.randn(rows, d, generator=g).to(device)
    runs = []
    for n in (1, 2, 4, 1):
        threads(n)
        enc = ops.sparse_encode_backward(
            grad_values, grad_l0, x, W, theta, offsets, indices, flags, bandwidth, True, True, True, True, True
        )
        dec = ops.sparse_decode_backward(grad_out, offsets, indices, values, W_dec, True, True)
        runs.append((*enc, *dec, ops.sparse_decode(offsets, indices, values, W_dec)))
    names = ("x", "W_enc", "b_enc", "threshold", "values", "W_dec", "decode")
    for run in runs[1:]:
        for name, got, want in zip(names, run, runs[0]):
            assert torch.equal(got, want), name
