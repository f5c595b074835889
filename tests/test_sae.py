"""JumpReLUSAE: init recipe, forward/loss math, gradients, decoder norm, bf16 autocast, errors (CPU)."""

import pytest
import torch

from jumprelu_ext import JumpReLUSAE

D_IN, D_SAE, BATCH = 8, 32, 16


def make_sae(seed=0, **kwargs):
    torch.manual_seed(seed)
    return JumpReLUSAE(D_IN, D_SAE, **kwargs)


def randomize(sae, seed=1):
    """Nonzero biases and perturbed weights, so the math checks exercise every term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def manual_forward(sae, x):
    pre = (x - sae.b_dec if sae.apply_b_dec_to_input else x) @ sae.W_enc + sae.b_enc
    theta = sae.threshold.detach()
    acts = pre * (pre > theta).to(pre.dtype)  # strict step: pre == θ is off
    return acts @ sae.W_dec + sae.b_dec, acts, (pre > theta).sum(-1).to(pre.dtype)


@pytest.mark.parametrize("param", ["log", "raw"])
def test_init(param):
    sae = make_sae(init_threshold=0.02, threshold_param=param)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert sae.W_enc.shape == (D_IN, D_SAE) and sae.W_dec.shape == (D_SAE, D_IN)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    assert sae.b_enc.shape == (D_SAE,) and sae.b_dec.shape == (D_IN,)
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), 0.02))
    names = {n for n, _ in sae.named_parameters()}
    theta_name = "log_threshold" if param == "log" else "threshold"
    assert names == {"W_enc", "b_enc", "W_dec", "b_dec", theta_name}
    assert sae.get_parameter(theta_name).dtype == torch.float32


def test_threshold_fp32_with_bf16_weights():
    sae = make_sae(dtype=torch.bfloat16)
    assert sae.W_enc.dtype == sae.W_dec.dtype == torch.bfloat16
    assert sae.log_threshold.dtype == torch.float32 and sae.threshold.dtype == torch.float32


@pytest.mark.parametrize("param", ["log", "raw"])
@pytest.mark.parametrize("centred", [False, True], ids=["plain", "b_dec-centred"])
def test_forward_matches_manual_math(param, centred):
    sae = make_sae(init_threshold=0.1, threshold_param=param, apply_b_dec_to_input=centred)
    randomize(sae)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(2))
    out = sae(x)
    assert out.reconstruction.shape == (BATCH, D_IN)
    assert out.acts.shape == (BATCH, D_SAE) and out.l0.shape == (BATCH,)
    recon, acts, l0 = manual_forward(sae, x)
    assert 0 < l0.sum() < BATCH * D_SAE  # some features on, some off
    torch.testing.assert_close(out.acts, acts)
    torch.testing.assert_close(out.l0, l0)
    torch.testing.assert_close(out.reconstruction, recon)
    # Extra leading dims pass through.
    out3 = sae(x.view(2, BATCH // 2, D_IN))
    assert out3.acts.shape == (2, BATCH // 2, D_SAE) and out3.l0.shape == (2, BATCH // 2)


def test_loss_matches_manual():
    sae = make_sae(init_threshold=0.1)
    randomize(sae)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(3))
    total, mse, l0_mean = sae.loss(x, l0_coefficient=0.05)[:3]
    recon, _, l0 = manual_forward(sae, x)
    mse_ref = ((x - recon) ** 2).sum(-1).mean()
    torch.testing.assert_close(mse, mse_ref)
    torch.testing.assert_close(l0_mean, l0.mean())
    torch.testing.assert_close(total, mse_ref + 0.05 * l0.mean())


def test_centred_encoder_gradients_match_manual_autograd():
    """With apply_b_dec_to_input, b_dec gets the decoder's gradient and, through x − b_dec, the
    encoder's (a JumpReLU passes H(pre − θ)·grad to pre, as autograd through pre·H does)."""
    sae = make_sae(init_threshold=0.1, apply_b_dec_to_input=True)
    randomize(sae)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(6))
    sae.loss(x, l0_coefficient=0.0).total.backward()
    params = {name: p.detach().clone().requires_grad_() for name, p in sae.named_parameters()}
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    acts = pre * (pre > sae.threshold.detach()).to(pre.dtype)
    ((x - (acts @ params["W_dec"] + params["b_dec"])) ** 2).sum(-1).mean().backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(sae.get_parameter(name).grad, params[name].grad, msg=name)
    plain = make_sae(init_threshold=0.1)
    randomize(plain)
    plain.loss(x, l0_coefficient=0.0).total.backward()
    assert (plain.b_dec.grad - sae.b_dec.grad).abs().max() > 1e-3  # the encoder's part is there


@pytest.mark.parametrize("param", ["log", "raw"])
def test_gradients_reach_threshold_and_weights(param):
    # θ = 0.5, ε = 0.1; b_enc = θ + 0.01 and tiny inputs put every pre inside the window (θ ± ε/2).
    eps, theta = 0.1, 0.5
    sae = make_sae(bandwidth=eps, init_threshold=theta, threshold_param=param)
    with torch.no_grad():
        sae.b_enc.fill_(theta + 0.01)
    x = 1e-3 * torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(4))
    theta_param = sae.log_threshold if param == "log" else sae.get_parameter("threshold")

    grads = {}
    for lam in (0.0, 1.0):
        sae.zero_grad(set_to_none=True)
        sae.loss(x, lam).total.backward()
        grads[lam] = theta_param.grad.clone()
        for name, p in sae.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert torch.isfinite(p.grad).all(), name
    # The L0 term alone: ∂mean(L0)/∂θ = −(1/ε)·(rows in window)/BATCH = −1/ε per feature here,
    # times dθ/dlogθ = θ in log space.
    expected = torch.full((D_SAE,), -1.0 / eps) * (theta if param == "log" else 1.0)
    torch.testing.assert_close(grads[1.0] - grads[0.0], expected, rtol=1e-4, atol=1e-4)


def test_decoder_norm_projection_and_renormalisation():
    sae = make_sae(init_threshold=0.1)
    randomize(sae)
    sae.normalize_decoder()
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(5))
    sae.loss(x, 0.01).total.backward()
    rows = sae.W_dec.detach()
    assert (sae.W_dec.grad * rows).sum(1).abs().max() > 1e-3  # a parallel component to remove
    sae.remove_parallel_decoder_grad()
    torch.testing.assert_close((sae.W_dec.grad * rows).sum(1), torch.zeros(D_SAE), atol=1e-6, rtol=0)

    torch.optim.SGD(sae.parameters(), lr=1.0).step()
    assert (sae.W_dec.detach().norm(dim=1) - 1).abs().max() > 1e-4  # the step moved off the sphere
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    assert sae.W_dec.requires_grad  # still a leaf parameter


@pytest.mark.parametrize("param", ["log", "raw"])
def test_bf16_autocast_keeps_threshold_fp32(param):
    sae = make_sae(init_threshold=0.1, threshold_param=param)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x)
        assert out.acts.dtype == torch.bfloat16  # pre was bf16 ...
        assert sae.threshold.dtype == torch.float32  # ... while θ stayed fp32
        total = sae.loss(x, 0.1).total
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    theta_param = sae.log_threshold if param == "log" else sae.get_parameter("threshold")
    assert theta_param.dtype == torch.float32 and theta_param.grad.dtype == torch.float32
    for name, p in sae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bad_input_dim_raises():
    sae = make_sae()
    with pytest.raises(ValueError, match=r"d_in=8.*got 7"):
        sae.encode(torch.randn(4, 7))
    with pytest.raises(ValueError, match="d_in=8"):
        sae(torch.tensor(1.0))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(d_in=0, d_sae=4),
        dict(d_in=4, d_sae=-1),
        dict(d_in=4.0, d_sae=4),
        dict(d_in=True, d_sae=4),
        dict(d_in=4, d_sae=4, bandwidth=0.0),
        dict(d_in=4, d_sae=4, bandwidth=float("nan")),
        dict(d_in=4, d_sae=4, init_threshold=-1e-3),
        dict(d_in=4, d_sae=4, threshold_param="exp"),
        dict(d_in=4, d_sae=4, apply_b_dec_to_input=1),
    ],
)
def test_bad_constructor_args_raise(kwargs):
    with pytest.raises(ValueError):
        JumpReLUSAE(**kwargs)


def test_tanh_and_pre_act_losses_match_manual():
    sae = make_sae(init_threshold=0.1)
    randomize(sae)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(7))
    out = sae.loss(x, l0_coefficient=0.05, sparsity_loss="tanh", tanh_scale=4.0, pre_act_loss_coefficient=0.3)
    recon, acts, l0 = manual_forward(sae, x)
    pre = x @ sae.W_enc + sae.b_enc
    norms = sae.W_dec.norm(dim=1)
    tanh_ref = torch.tanh(4.0 * acts.abs() * norms).sum(-1).mean()
    pre_act_ref = (torch.relu(sae.threshold - pre) * norms).sum(-1).mean()
    mse_ref = ((x - recon) ** 2).sum(-1).mean()
    torch.testing.assert_close(out.sparsity, tanh_ref)
    torch.testing.assert_close(out.pre_act, pre_act_ref)
    torch.testing.assert_close(out.l0, l0.mean())
    torch.testing.assert_close(out.total, mse_ref + 0.05 * tanh_ref + 0.3 * pre_act_ref)


def test_pre_act_loss_revives_a_feature_that_never_fires():
    sae = make_sae(init_threshold=0.1)
    with torch.no_grad():
        sae.b_enc[0] = -100.0  # feature 0 never fires: the reconstruction gives it no gradient
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(8))
    sae.loss(x, 0.0).total.backward()
    assert sae.b_enc.grad[0] == 0
    sae.zero_grad(set_to_none=True)
    sae.loss(x, 0.0, pre_act_loss_coefficient=1.0).total.backward()
    assert sae.b_enc.grad[0] < 0  # descent raises b_enc[0] toward the threshold


def test_unknown_sparsity_loss_is_rejected():
    with pytest.raises(ValueError, match="sparsity_loss"):
        make_sae().loss(torch.zeros(2, D_IN), 0.1, sparsity_loss="l1")


def test_a_feature_range_starts_as_the_same_rows_of_the_whole_sae():
    # Feature sharding draws only a rank's rows; they must be the whole SAE's rows (blocks of 1024
    # rows are drawn independently, so ranges that start and end inside blocks are the test).
    torch.manual_seed(3)
    whole = JumpReLUSAE(D_IN, 3000)
    torch.manual_seed(3)
    part = JumpReLUSAE(D_IN, 1100, first_feature=1500)
    assert torch.equal(part.W_dec, whole.W_dec[1500:2600])
    assert torch.equal(part.W_enc, whole.W_enc[:, 1500:2600])
    torch.manual_seed(4)
    assert not torch.equal(JumpReLUSAE(D_IN, 3000).W_dec, whole.W_dec)  # the global seed decides


def test_fire_counts_from_forward_and_loss():
    """forward and loss add each feature's rows with acts != 0 to fire_counts, in the same pass,
    and nothing else changes."""
    sae = make_sae(init_threshold=0.05)
    randomize(sae)
    x = torch.randn(3, BATCH, D_IN, generator=torch.Generator().manual_seed(7))
    counts = torch.zeros(D_SAE, dtype=torch.int64)
    out = sae(x, fire_counts=counts)
    expected = (out.acts != 0).sum((0, 1))
    assert 0 < int(expected.sum()) < x.shape[0] * BATCH * D_SAE
    assert torch.equal(counts, expected)
    plain = sae(x)
    assert all(torch.equal(a, b) for a, b in zip(out, plain))
    loss = sae.loss(x, 1e-2, fire_counts=counts)
    assert torch.equal(counts, 2 * expected)
    assert torch.equal(loss.total, sae.loss(x, 1e-2).total)
    with pytest.raises(TypeError, match="jumprelu_l0: fire_counts must be int64"):
        sae(x, fire_counts=torch.zeros(D_SAE))


def test_loss_means_are_over_every_leading_index():
    sae = make_sae(init_threshold=0.1)
    randomize(sae)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(9))
    flat = sae.loss(x, 0.05, sparsity_loss="tanh", pre_act_loss_coefficient=0.3)
    stacked = sae.loss(x.view(2, BATCH // 2, D_IN), 0.05, sparsity_loss="tanh", pre_act_loss_coefficient=0.3)
    for name in ("total", "mse", "l0", "sparsity", "pre_act"):
        torch.testing.assert_close(getattr(stacked, name), getattr(flat, name), msg=name)
