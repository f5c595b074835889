"""Tests for jumprelu_ext.train.report.metrics and jumprelu_ext.plots."""

import math
import os

import pytest
import torch
from conftest import DEVICES

from jumprelu_ext.ops import jumprelu
from jumprelu_ext.sae import JumpReLUSAE
from jumprelu_ext.train.report.metrics import FiringTracker, density_histogram, evaluate
from jumprelu_ext.train.report.plots import plot_curves, plot_density

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _data(n, d_in, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g) * torch.linspace(0.5, 2.0, d_in) + offset


def _random_sae(d_in, d_sae, device, seed=0):
    torch.manual_seed(seed)
    sae = JumpReLUSAE(d_in, d_sae, init_threshold=0.05, device=device)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    return sae


def _brute_force(sae, x):
    """Direct full-tensor computation on the concatenated data."""
    with torch.no_grad():
        out = sae(x.to(sae.W_dec.device))
    xd = x.double()
    rec = out.reconstruction.double().cpu()
    sse = (xd - rec).pow(2).sum()
    fired = (out.acts != 0).cpu()
    return {
        "l0": fired.sum(-1).double().mean().item(),
        "mse": (sse / x.shape[0]).item(),
        "fvu": (sse / (xd - xd.mean(0)).pow(2).sum()).item(),
        "rates": fired.double().mean(0),
    }


# ---------------------------------------------------------------- FiringTracker


def _fire(tracker, pre):
    """The trainer's path: the forward kernel (θ = 0, so acts = pre where pre > 0) adds each
    feature's fires to tracker.counts, then add_tokens records the rows."""
    pre = pre.reshape(-1, tracker.d_sae)
    jumprelu(pre, torch.zeros(tracker.d_sae, device=pre.device), fire_counts=tracker.counts)
    tracker.add_tokens(pre.shape[0])


@pytest.mark.parametrize("device", DEVICES)
def test_tracker_counts_ignore_negative_zero(device):
    acts = torch.tensor(
        [
            [[1.0, -0.0, 0.0, 0.0], [2.0, 0.0, -0.0, 0.0]],
            [[0.5, 3.0, -0.0, 0.0], [-0.0, -0.0, -0.0, 0.0]],
        ],
        device=device,
    )
    assert torch.signbit(acts).sum() == 6  # the -0.0 entries really are negative zeros
    t = FiringTracker(4, device=device)
    _fire(t, acts)
    assert t.counts.dtype == torch.int64 and t.counts.device == acts.device
    assert t.counts.tolist() == [3, 1, 0, 0]
    assert t.tokens == 4
    assert torch.allclose(t.firing_rate().cpu(), torch.tensor([0.75, 0.25, 0.0, 0.0], dtype=torch.float64))
    assert t.dead_fraction() == 0.5
    assert t.dense_fraction() == 0.5  # 0.75 and 0.25 > 0.1
    assert t.dense_fraction(threshold=0.3) == 0.25

    _fire(t, torch.tensor([[0.0, 0.0, 7.0, 0.0]], device=device))
    assert t.counts.tolist() == [3, 1, 1, 0] and t.tokens == 5
    assert t.dead_fraction() == 0.25


def test_tracker_dense_is_strictly_greater():
    t = FiringTracker(2)
    acts = torch.zeros(10, 2)
    acts[0, 0] = 1.0  # exactly 10%: not dense
    acts[:2, 1] = 1.0  # 20%: dense
    _fire(t, acts)
    assert t.dense_fraction() == 0.5


def test_tracker_empty_and_reset():
    t = FiringTracker(3)
    assert math.isnan(t.dead_fraction()) and math.isnan(t.dense_fraction())
    assert torch.isnan(t.firing_rate()).all()
    _fire(t, torch.ones(2, 3))
    t.reset()
    assert t.tokens == 0 and t.counts.tolist() == [0, 0, 0]


def test_tracker_state_round_trip():
    t = FiringTracker(5)
    _fire(t, torch.tensor([[1.0, 0.0, 2.0, 0.0, -0.0], [0.0, 0.0, 3.0, 1.0, 0.0]]))
    state = t.state_dict()
    # the state is a snapshot, not a view of the live counts
    _fire(t, torch.ones(1, 5))
    u = FiringTracker(5)
    u.load_state_dict(state)
    assert u.tokens == 2 and u.counts.tolist() == [1, 0, 2, 1, 0]
    assert u.counts.dtype == torch.int64
    with pytest.raises(ValueError):
        FiringTracker(4).load_state_dict(state)


@pytest.mark.parametrize("device", DEVICES)
def test_tracker_fed_by_the_sae_counts_nonzero_acts(device):
    """The SAE's forward pass adds to tracker.counts: the same counts as acts != 0 over the same
    activations, over two batches (one of them 3-d)."""
    sae = _random_sae(8, 32, device)
    tracker = FiringTracker.for_sae(sae)
    expected = torch.zeros(32, dtype=torch.int64)
    for x in (_data(60, 8, seed=3), _data(24, 8, seed=4).reshape(4, 6, 8)):
        x = x.to(device)
        loss = sae.loss(x, 1e-3, fire_counts=tracker.counts)
        tracker.add_tokens(x.shape[:-1].numel())
        expected += (loss.output.acts != 0).reshape(-1, 32).sum(0).cpu()
    assert 0 < int(expected.sum()) < 84 * 32, "the test needs some but not all features firing"
    assert torch.equal(tracker.counts.cpu(), expected) and tracker.tokens == 84


@pytest.mark.parametrize("tokens", [-1, 1.5, True, None])
def test_tracker_add_tokens_rejects_non_counts(tokens):
    with pytest.raises(ValueError, match="FiringTracker.add_tokens: tokens must be an int >= 0"):
        FiringTracker(3).add_tokens(tokens)


def test_tracker_for_sae():
    sae = JumpReLUSAE(4, 6)
    t = FiringTracker.for_sae(sae)
    assert t.counts.shape == (6,) and t.counts.device == sae.W_dec.device


# ---------------------------------------------------------------- evaluate


@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_matches_brute_force(device):
    d_in, d_sae = 8, 32
    x = _data(300, d_in, seed=1)
    sae = _random_sae(d_in, d_sae, device)
    ref = _brute_force(sae, x)
    res = evaluate(sae, [x[:100], x[100:250], x[250:]])
    assert res["tokens"] == 300
    assert res["l0"] == pytest.approx(ref["l0"], rel=1e-12)
    assert res["mse"] == pytest.approx(ref["mse"], rel=1e-5)
    assert res["fvu"] == pytest.approx(ref["fvu"], rel=1e-5)
    assert torch.allclose(res["firing_rates"], ref["rates"])
    assert res["dead_fraction"] == pytest.approx((ref["rates"] == 0).double().mean().item())
    assert res["dense_fraction"] == pytest.approx((ref["rates"] > 0.1).double().mean().item())
    assert 0 < res["l0"] < d_sae and res["fvu"] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_batching_invariant(device):
    d_in = 6
    x = _data(257, d_in, seed=2, offset=3.0)
    sae = _random_sae(d_in, 24, device, seed=3)
    splits = [[x], list(x.split(1)), list(x.split(16)), [x[:7], x[7:200], x[200:]]]
    results = [evaluate(sae, iter(s)) for s in splits]  # generators are fine: one pass
    # fp32 tolerance: the SAE's fp32 matmuls may round differently for different batch shapes
    for r in results[1:]:
        assert r["fvu"] == pytest.approx(results[0]["fvu"], rel=1e-6)
        assert r["mse"] == pytest.approx(results[0]["mse"], rel=1e-6)
        assert r["l0"] == results[0]["l0"]
        assert r["tokens"] == 257
    # leading dims are flattened into tokens
    r3d = evaluate(sae, [x[:256].reshape(16, 16, d_in), x[256:]])
    assert r3d["fvu"] == pytest.approx(results[0]["fvu"], rel=1e-6)


def test_evaluate_exact_reconstruction():
    """W_enc = [I, -I], W_dec = [I; -I]: x̂ = relu(x) − relu(−x) = x when every |x_i| > θ."""
    d_in = 5
    sae = JumpReLUSAE(d_in, 2 * d_in, init_threshold=1e-6)
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    x = _data(64, d_in, seed=4)
    x = x + 0.01 * torch.sign(x)  # keep every |x_i| well above θ
    res = evaluate(sae, x.split(10))
    assert res["mse"] == pytest.approx(0.0, abs=1e-12)
    assert res["fvu"] == pytest.approx(0.0, abs=1e-12)
    assert res["l0"] == d_in  # exactly one of the pair fires per dimension
    assert res["dead_fraction"] == 0.0


def test_evaluate_mean_predictor_has_fvu_one():
    d_in = 7
    x = _data(500, d_in, seed=5, offset=100.0)  # a large mean: checks the one-pass variance
    sae = JumpReLUSAE(d_in, 16)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.copy_(x.double().mean(0).float())
    res = evaluate(sae, x.split(33))
    assert res["fvu"] == pytest.approx(1.0, rel=1e-5)
    assert res["mse"] == pytest.approx(_brute_force(sae, x)["mse"], rel=1e-6)


def test_evaluate_restores_mode_and_rejects_empty():
    sae = JumpReLUSAE(4, 8)
    sae.train()
    evaluate(sae, [torch.randn(10, 4)])
    assert sae.training
    with pytest.raises(ValueError):
        evaluate(sae, [])
    with pytest.raises(ValueError):
        evaluate(sae, [torch.randn(3, 5)])
    assert sae.training


# ---------------------------------------------------------------- density histogram


def test_density_histogram_counts():
    rates = torch.tensor([0.0, 0.0, 1e-4, 2e-4, 1e-2, 0.5, 1.0])
    h = density_histogram(rates, bins=[-5, -3, -1, 0])
    counts, edges, never = h
    assert never == 2
    assert counts.tolist() == [2, 1, 2]  # [-5,-3): 1e-4, 2e-4; [-3,-1): 1e-2; [-1,0]: 0.5, 1.0
    assert edges.tolist() == [-5, -3, -1, 0]
    h2 = density_histogram([0.0, 0.1, 0.01], bins=4)
    assert h2.counts.sum() == 2 and len(h2.edges) == 5 and h2.never_fired == 1
    with pytest.raises(ValueError):
        density_histogram([0.1, -0.1])


# ---------------------------------------------------------------- plots


def _check_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_SIGNATURE
    assert os.path.getsize(path) > 100
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temp files left


def test_plot_density(tmp_path):
    rates = torch.cat([torch.zeros(5), torch.logspace(-6, -0.5, 95)])
    path = tmp_path / "density.png"
    plot_density(rates, path)
    _check_png(str(path))
    # overwriting works, and an all-dead SAE still plots
    plot_density(torch.zeros(10), path)
    _check_png(str(path))


def test_plot_curves(tmp_path):
    rows = [
        {"step": s, "loss": 1.0 / (s + 1), "l0": 50 - s, "l0_coefficient": 1e-3 * s, "lr": 7e-5}
        for s in range(0, 100, 10)
    ]
    rows[3]["fvu"] = 0.4
    rows[7]["fvu"] = 0.3
    path = tmp_path / "curves.png"
    plot_curves(rows, str(path))
    _check_png(str(path))
    (tmp_path / "sub").mkdir()
    only_loss = tmp_path / "sub" / "c.png"
    plot_curves([{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}], only_loss)
    _check_png(str(only_loss))
    with pytest.raises(ValueError):
        plot_curves([{"step": 0}], tmp_path / "sub" / "none.png")
    assert os.listdir(tmp_path / "sub") == ["c.png"]
