"""The sparse step equals the dense step: values and every gradient, through the SAE module
(docs/ops.md#the-sparse-step). Fuzzed shapes, dtypes, strides, empty and all-firing rows, ε at
its edges, ste_to_input, the tanh penalty, apply_b_dec_to_input; opcheck and torch.compile of
the ops; the auto policy."""

import pytest
import torch
from conftest import DEVICES, requires_compiled

import jumprelu_ext
from jumprelu_ext.sae import JumpReLUSAE
from jumprelu_ext.sparse import ACTIVE, WINDOW, SparseActs, sparse_decode, sparse_encode, support_flags
from jumprelu_ext.step_policy import DENSE_ABOVE, MEASURE_EVERY, SPARSE_BELOW, StepPolicy

# (atol, rtol) per parameter dtype for losses and gradients: both steps compute the same terms
# in a different summation order (and the sparse decoder accumulates in fp32 under autocast).
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 2e-4)}


def make_sae(d_in, d_sae, device, dtype=torch.float32, seed=0, **options):
    torch.manual_seed(seed)
    options = {"bandwidth": 0.2, "init_threshold": 0.25, "threshold_param": "raw", **options}
    sae = JumpReLUSAE(d_in, d_sae, device=device, **options).to(dtype)
    with torch.no_grad():  # break the W_enc = W_decᵀ symmetry and give θ a spread
        g = torch.Generator().manual_seed(seed + 1)
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=g, dtype=dtype).to(device))
        sae.b_enc.copy_(0.2 * torch.randn(d_sae, generator=g, dtype=dtype).to(device))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g, dtype=dtype).to(device))
        set_threshold(sae, 0.05 + 0.4 * torch.rand(d_sae, generator=g).to(device))
    return sae


@torch.no_grad()
def set_threshold(sae, theta):
    """θ's parameter in place (``sae.threshold`` is a property: a copy when the dtype differs)."""
    params = dict(sae.named_parameters())
    if sae.threshold_param == "raw":
        params["threshold"].copy_(theta)
    else:
        params["log_threshold"].copy_(torch.as_tensor(theta).log())


def step_results(sae, x, path, **loss_kwargs):
    sae.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    loss = sae.loss(x, loss_kwargs.pop("l0_coefficient", 0.3), step=path, **loss_kwargs)
    loss.total.backward()
    values = {k: getattr(loss, k).detach() for k in ("total", "mse", "l0", "sparsity")}
    grads = {name: p.grad.clone() if p.grad is not None else None for name, p in sae.named_parameters()}
    if x.requires_grad:
        grads["x"] = x.grad.clone()
    return values, grads, loss


def assert_steps_equal(sae, x, dtype=torch.float32, **loss_kwargs):
    dense_values, dense_grads, dense = step_results(sae, x, "dense", **dict(loss_kwargs))
    sparse_values, sparse_grads, sparse = step_results(sae, x, "sparse", **dict(loss_kwargs))
    assert dense.step == "dense" and sparse.step == "sparse"
    atol, rtol = TOL[dtype]
    # The loss's terms are reduced in fp32 whatever the SAE's dtype (JumpReLUSAE.loss), in another order
    # on each path (a dense row sum against index_add over the support): each value's own dtype's tolerance.
    for key in dense_values:
        value_atol, value_rtol = TOL[dense_values[key].dtype]
        torch.testing.assert_close(sparse_values[key], dense_values[key], atol=value_atol, rtol=value_rtol, msg=key)
    for name, grad in dense_grads.items():
        if grad is None:
            assert sparse_grads[name] is None or not sparse_grads[name].any(), name
            continue
        scale = grad.abs().max().item() + 1.0
        torch.testing.assert_close(sparse_grads[name], grad, atol=atol * scale, rtol=rtol, msg=name)
    return sparse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
def test_fuzzed_shapes_and_options(device, seed):
    g = torch.Generator().manual_seed(seed)
    d_in = int(torch.randint(1, 40, (), generator=g))
    d_sae = int(torch.randint(1, 300, (), generator=g))
    rows = int(torch.randint(0, 70, (), generator=g))
    options = {
        "ste_to_input": bool(seed % 2),
        "apply_b_dec_to_input": seed % 3 == 0,
        "threshold_param": ("raw", "log")[seed % 2],
    }
    sae = make_sae(d_in, d_sae, device, torch.float64, seed=seed, **options)
    x = torch.randn(rows, d_in, generator=g, dtype=torch.float64).to(device)
    assert_steps_equal(sae, x, torch.float64, sparsity_loss=("step", "tanh")[seed % 2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparsity_loss", ["step", "tanh"])
@pytest.mark.parametrize("ste_to_input", [False, True])
def test_float32(device, sparsity_loss, ste_to_input):
    sae = make_sae(24, 200, device, ste_to_input=ste_to_input, apply_b_dec_to_input=True)
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(3)).to(device)
    assert_steps_equal(sae, x, sparsity_loss=sparsity_loss)


@pytest.mark.parametrize("device", DEVICES)
def test_input_gradient_and_leading_dims(device):
    """x [2, 5, d_in] with x.requires_grad: the encoder's ∂x is formed sparsely too."""
    sae = make_sae(12, 90, device, torch.float64, ste_to_input=True, apply_b_dec_to_input=True)
    x = torch.randn(2, 5, 12, dtype=torch.float64).to(device).requires_grad_()
    sparse = assert_steps_equal(sae, x, torch.float64)
    assert sparse.output.reconstruction.shape == (2, 5, 12) and sparse.output.l0.shape == (2, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_input(device):
    sae = make_sae(16, 120, device, torch.float64)
    x = torch.randn(40, 32, dtype=torch.float64).to(device)[:, ::2]  # non-contiguous rows
    assert not x.is_contiguous()
    assert_steps_equal(sae, x, torch.float64, sparsity_loss="tanh")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows_and_rows_where_everything_fires(device):
    sae = make_sae(8, 50, device, torch.float64)
    x = torch.randn(30, 8, dtype=torch.float64).to(device)
    with torch.no_grad():
        sae.b_enc[:] = -100.0  # nothing fires, nothing is in a window ...
        sae.b_enc[:25] = 100.0  # ... except the first 25 features, which fire on every row
    sparse = assert_steps_equal(sae, x, torch.float64, sparsity_loss="tanh")
    assert sparse.output.acts.offsets.diff().tolist() == [25] * 30
    with torch.no_grad():
        sae.b_enc[:] = -100.0  # every row empty
    sparse = assert_steps_equal(sae, x, torch.float64)
    assert sparse.output.acts.indices.numel() == 0 and sparse.total.item() > 0
    with torch.no_grad():
        sae.b_enc[:] = 100.0  # every entry fires
    sparse = assert_steps_equal(sae, x, torch.float64, sparsity_loss="tanh")
    assert sparse.support_density == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_bandwidth_edges(device):
    """pre exactly at θ ± ε/2 (outside: the window is open) and just inside; pre == θ (not active)."""
    d_in, d_sae, eps = 1, 6, 0.25
    sae = make_sae(d_in, d_sae, device, torch.float64, bandwidth=eps, ste_to_input=True)
    with torch.no_grad():
        sae.W_enc[:] = 1.0
        sae.b_enc[:] = 0.0
        sae.b_dec[:] = 0.0
    set_threshold(sae, torch.full((d_sae,), 0.5))
    inside = eps / 2 * (1 - 1e-12)
    pre = torch.tensor([0.5, 0.5 + eps / 2, 0.5 - eps / 2, 0.5 + inside, 0.5 - inside, 0.9], dtype=torch.float64)
    x = pre.unsqueeze(1).to(device)
    sparse = assert_steps_equal(sae, x, torch.float64)
    flags = sparse.output.acts.flags.tolist()
    # Per row, all six features alike: θ itself (window, not active), the window's open ends
    # (above: active only; below: not in the support), just inside above and below, well above.
    per_row = [WINDOW, ACTIVE, WINDOW | ACTIVE, WINDOW, ACTIVE]
    assert flags == [f for f in per_row for _ in range(d_sae)]
    assert sparse.output.acts.offsets.diff().tolist() == [6, 6, 0, 6, 6, 6]


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast(device):
    """bf16 under autocast: both steps run the encoder product in bf16, but the sparse step adds
    b_enc in fp32 on the CPU (as SAELens does) and accumulates its decoder in fp32, where the
    dense one rounds pre and x̂ to bf16. Entries near θ's window edges then fall differently,
    so they agree to bf16's precision: losses to 1%, every gradient to 10% in norm."""
    sae = make_sae(32, 256, device)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(5)).to(device)
    results = {}
    for path in ("dense", "sparse"):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            results[path] = step_results(sae, x, path, sparsity_loss="tanh")
    (dv, dg, _), (sv, sg, _) = results["dense"], results["sparse"]
    for key in dv:
        torch.testing.assert_close(sv[key], dv[key], atol=0.05, rtol=0.01, msg=key)
    for name in dg:
        assert sg[name].dtype == dg[name].dtype, name
        assert (sg[name] - dg[name]).norm() <= 0.1 * dg[name].norm(), name


def test_pre_activation_loss_needs_the_dense_step():
    sae = make_sae(8, 40, "cpu")
    x = torch.randn(10, 8)
    assert sae.loss(x, 0.1, pre_act_loss_coefficient=0.5).step == "dense"
    with pytest.raises(ValueError, match="pre-activation loss"):
        sae.loss(x, 0.1, pre_act_loss_coefficient=0.5, step="sparse")


def test_auto_policy_switches_on_the_measured_density():
    policy = StepPolicy("auto")
    assert policy.choose(False) == "dense" and policy.wants_density("dense")
    policy.observe("dense", SPARSE_BELOW * 2)  # dense enough: stays dense ...
    assert policy.choose(False) == "dense"
    for _ in range(MEASURE_EVERY - 1):
        assert not policy.wants_density("dense")  # ... and measures again only every MEASURE_EVERY steps
        policy.observe("dense", None)
    assert policy.wants_density("dense")
    policy.observe("dense", SPARSE_BELOW / 2)
    assert policy.choose(False) == "sparse"
    policy.observe("sparse", (SPARSE_BELOW + DENSE_ABOVE) / 2)  # hysteresis: between the two, stays
    assert policy.choose(False) == "sparse"
    policy.observe("sparse", DENSE_ABOVE * 1.5)
    assert policy.choose(False) == "dense"
    assert policy.choose(True) == "dense"
    with pytest.raises(ValueError, match="step must be one of"):
        StepPolicy("fast")


def test_auto_in_the_module_moves_to_sparse_when_the_support_is_small():
    sae = make_sae(16, 400, "cpu")
    x = torch.randn(32, 16)
    with torch.no_grad():
        sae.b_enc[:] = -10.0  # nothing fires or sits near θ
    first = sae.loss(x, 0.1)
    assert first.step == "dense" and first.support_density < SPARSE_BELOW
    assert sae.loss(x, 0.1).step == "sparse"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_rows", [0, 1, 7])
def test_ops_against_the_dense_support(device, chunk_rows):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(23, 9, generator=g, dtype=torch.float64).to(device)
    W = torch.randn(9, 70, generator=g, dtype=torch.float64).to(device)
    b = torch.randn(70, generator=g, dtype=torch.float64).to(device)
    theta = (0.5 + torch.rand(70, generator=g, dtype=torch.float64)).to(device)
    x[4, 0] = float("nan")  # a NaN row: every entry NaN, all in the support, NaN values
    b[3] = -float("inf")  # pre −inf in column 3: its activation is NaN (−inf · 0), kept
    fire_counts = torch.zeros(70, dtype=torch.int64, device=device)
    acts = sparse_encode(x, W, b, theta, 0.3, fire_counts=fire_counts, chunk_rows=chunk_rows)
    pre = torch.addmm(b, x, W)
    flags = support_flags(pre, theta, 0.3)
    expected = pre * (pre > theta)
    in_support = (flags != 0) | expected.isnan()
    assert acts.offsets.tolist() == [0] + in_support.sum(1).cumsum(0).tolist()
    assert torch.equal(acts.indices, in_support.nonzero()[:, 1])
    assert torch.equal(acts.flags, flags[in_support])
    dense = acts.to_dense(70)
    assert expected[:, 3].isnan().all() and expected[4].isnan().all()
    torch.testing.assert_close(dense, expected, equal_nan=True)
    assert torch.equal(acts.l0, (pre > theta).sum(1).float())
    assert torch.equal(fire_counts, ((expected != 0) | expected.isnan()).sum(0))
    W_dec = torch.randn(70, 9, generator=g, dtype=torch.float64).to(device)
    torch.testing.assert_close(sparse_decode(acts, W_dec), dense @ W_dec, equal_nan=True)


@requires_compiled
def test_opcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(13, 6, generator=g)
    W = torch.randn(6, 40, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True)
    theta = (0.3 + torch.rand(40, generator=g)).requires_grad_()
    ops = torch.ops.jumprelu_ext
    # opcheck's aot_dispatch tests sum every output into one accumulator, which fails on an op
    # whose first output is int64 (offsets) and a later one float; test_torch_compile_fullgraph
    # runs forward and backward through AOTAutograd instead.
    encode_utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.sparse_encode.default, (x, W, b, theta, 0.4, True, 3), test_utils=encode_utils)
    fire_counts = torch.zeros(40, dtype=torch.int64)
    torch.library.opcheck(
        ops.sparse_encode.counted,
        (x, W, b, theta, 0.4, False, 0, fire_counts),
        test_utils=("test_schema", "test_faketensor"),
    )
    acts = sparse_encode(x, W.detach(), b.detach(), theta.detach(), 0.4)
    values = acts.values.clone().requires_grad_()
    W_dec = torch.randn(40, 6, generator=g, requires_grad=True)
    torch.library.opcheck(ops.sparse_decode.default, (acts.offsets, acts.indices, values, W_dec))


@pytest.mark.slow
@requires_compiled
def test_torch_compile_fullgraph():
    sae = make_sae(10, 64, "cpu")
    x = torch.randn(20, 10)

    def step(x, W_enc, b_enc, theta, W_dec):
        acts = sparse_encode(x, W_enc, b_enc, theta, 0.2)
        recon = sparse_decode(acts, W_dec)
        return (recon - x).pow(2).sum() + acts.l0.sum()

    params = [sae.W_enc, sae.b_enc, sae.threshold, sae.W_dec]
    eager = step(x, *params)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(step, fullgraph=True, dynamic=False)(x, *params)
    compiled_grads = torch.autograd.grad(compiled, params)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want)


@requires_compiled
@pytest.mark.parametrize("device", DEVICES)
def test_gradients_bitwise_over_thread_counts(device):
    """θ's gradient (and, on the CPU, every weight gradient) does not depend on the thread count."""
    sae = make_sae(20, 300, device, ste_to_input=True)
    x = torch.randn(200, 20, generator=torch.Generator().manual_seed(9)).to(device)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            runs.append(step_results(sae, x, "sparse", sparsity_loss="tanh")[1])
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for name in ("threshold", "W_enc", "b_enc", "W_dec"):
            assert torch.equal(run[name], runs[0][name]), name


def test_sparse_acts_is_a_public_type():
    assert SparseActs._fields == ("offsets", "indices", "values", "flags", "l0")
    assert isinstance(jumprelu_ext.COMPILED, bool)
