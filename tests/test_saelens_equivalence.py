"""The "jumprelu_ext" SAELens architecture against SAELens's own JumpReLUTrainingSAE, one step at a
time: on the same weights and batch, every loss term and every parameter gradient agree within
float tolerance, for each sparsity mode and option, on the dense (fused op) and the sparse step.

sae-lens is installed by `make test` (the Makefile's test venv); the suite skips only where it is
absent (a bare `pip install -e .`).
"""

import ast
import logging

import pytest
import torch

pytest.importorskip("sae_lens")

from sae_lens.registry import (  # noqa: E402
    SAE_TRAINING_CLASS_REGISTRY,  # noqa: E402
    get_sae_class,
    get_sae_training_class,
)
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig  # noqa: E402
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig, TrainStepInput  # noqa: E402

import jumprelu_ext.saelens as plugin  # noqa: E402
from jumprelu_ext.saelens import JumpReLUExtTrainingSAE, JumpReLUExtTrainingSAEConfig  # noqa: E402

D_IN, D_SAE, ROWS = 24, 96, 160
STEPS = ["dense", "sparse"]


def make_pair(seed=0, step="dense", **options):
    """SAELens's SAE and ours with identical parameters: ours built from the same seed (so the
    initialisation is checked too), then both given a spread of biases and thresholds, so that
    the batch has entries on both sides of θ and in its window."""
    base = dict(d_in=D_IN, d_sae=D_SAE, jumprelu_bandwidth=0.2, jumprelu_init_threshold=0.3)
    base.update(options)
    torch.manual_seed(seed)
    theirs = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**base))
    torch.manual_seed(seed)
    ours = JumpReLUExtTrainingSAE(JumpReLUExtTrainingSAEConfig(**base, jumprelu_ext_step=step))
    for name, value in theirs.state_dict().items():
        assert torch.equal(value, ours.state_dict()[name]), f"initial {name} differs"
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        theirs.W_enc.mul_(8.0)  # pre of order 1: a share of entries in the window and active
        theirs.b_dec.copy_(0.3 * torch.randn(D_IN, generator=g))
        theirs.b_enc.copy_(0.2 * torch.randn(D_SAE, generator=g))
        theirs.threshold.copy_(0.2 + 0.6 * torch.rand(D_SAE, generator=g))
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def batch(seed=0, rows=ROWS, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed + 100)
    return (torch.randn(rows, D_IN, generator=g) * 1.5 + 0.2).to(dtype)


def dead_mask(seed=0, share=0.25):
    return torch.rand(D_SAE, generator=torch.Generator().manual_seed(seed + 200)) < share


def step_of(sae, x, dead=None, coefficient=0.7):
    sae.zero_grad()
    out = sae.training_forward_pass(
        TrainStepInput(
            sae_in=x, coefficients={"l0": coefficient}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
        )
    )
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters()}


def close(actual, expected, rtol, atol, name):
    """assert_close with atol relative to the expected tensor's largest magnitude (so a value
    that cancels to near zero is held to the precision of the terms that formed it), and never
    tighter than a few ulps of the tensor's dtype (θ is float32 in a float64 SAE, as in SAELens)."""
    expected = expected.detach()
    finite = expected[expected.isfinite()]
    scale = max(finite.abs().max().item(), 1.0) if finite.numel() else 1.0
    floor = 4 * torch.finfo(expected.dtype).eps
    torch.testing.assert_close(
        actual,
        expected,
        rtol=max(rtol, floor),
        atol=max(atol, floor) * scale,
        equal_nan=True,
        msg=lambda m: f"{name}: {m}",
    )


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def assert_same_step(theirs_out, theirs_grads, ours_out, ours_grads, rtol=1e-5, atol=1e-6):
    assert set(ours_out.losses) == set(theirs_out.losses)
    for name, value in theirs_out.losses.items():
        assert ours_out.losses[name].dtype == value.dtype, name
        close(ours_out.losses[name], value, rtol, atol, name)
    close(ours_out.loss, theirs_out.loss, rtol, atol, "loss")
    close(ours_out.sae_out, theirs_out.sae_out, rtol, atol, "sae_out")
    for name, grad in theirs_grads.items():
        assert ours_grads[name].dtype == grad.dtype, name
        close(ours_grads[name], grad, rtol, atol, f"grad {name}")


MODES = [
    pytest.param({}, id="step"),
    pytest.param({"jumprelu_sparsity_loss_mode": "tanh"}, id="tanh"),
    pytest.param({"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": 12.0}, id="quadratic"),
]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("pre_act", [None, 3e-2], ids=["no-pre-act", "pre-act"])
@pytest.mark.parametrize("ste_to_input", [False, True], ids=["ste-theta", "ste-input"])
@pytest.mark.parametrize("mode", MODES)
def test_step_equals_saelens(mode, ste_to_input, pre_act, step):
    options = dict(mode, jumprelu_ste_to_input=ste_to_input, pre_act_loss_coefficient=pre_act)
    theirs, ours = make_pair(step=step, **options)
    x, dead = batch(), dead_mask()
    theirs_out, theirs_grads = step_of(theirs, x, dead)
    ours_out, ours_grads = step_of(ours, x, dead)
    assert ours_out.metrics["jumprelu_ext/sparse_step"] == float(step == "sparse")
    assert_same_step(theirs_out, theirs_grads, ours_out, ours_grads)
    # Activations: the dense step hands the trainer a dense tensor, the sparse step a COO one of
    # the active entries; the same firing pattern either way.
    acts = ours_out.feature_acts.to_dense() if step == "sparse" else ours_out.feature_acts
    assert ours_out.feature_acts.is_sparse == (step == "sparse")
    assert torch.equal(acts != 0, theirs_out.feature_acts != 0)
    close(acts, theirs_out.feature_acts, 1e-5, 1e-6, "feature_acts")
    if step == "dense":
        assert torch.equal(ours_out.hidden_pre, theirs_out.hidden_pre)
    else:
        assert ours_out.hidden_pre.shape == (0, D_SAE)  # never formed on the sparse step
    assert ours.step_policy.mode == step


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"apply_b_dec_to_input": False}, id="no-b_dec-to-input"),
        pytest.param({"normalize_activations": "layer_norm"}, id="layer_norm"),
        pytest.param({"normalize_activations": "constant_norm_rescale"}, id="constant_norm_rescale"),
        pytest.param({"decoder_init_norm": None}, id="decoder_init_norm-None"),
        pytest.param({"decoder_init_norm": 0.5, "jumprelu_sparsity_loss_mode": "tanh"}, id="decoder_init_norm-tanh"),
    ],
)
def test_options_keep_their_meaning(options, step):
    theirs, ours = make_pair(step=step, seed=3, **options)
    x = batch(seed=3)
    assert_same_step(*step_of(theirs, x), *step_of(ours, x))


def test_no_dead_features_gives_saelens_zero_pre_act_loss():
    for step in STEPS:
        theirs, ours = make_pair(step=step, pre_act_loss_coefficient=1.0)
        x = batch()
        for dead in (None, torch.zeros(D_SAE, dtype=torch.bool)):
            theirs_out, theirs_grads = step_of(theirs, x, dead)
            ours_out, ours_grads = step_of(ours, x, dead)
            assert ours_out.losses["pre_act_loss"].item() == 0.0
            assert_same_step(theirs_out, theirs_grads, ours_out, ours_grads)


@pytest.mark.parametrize("step", STEPS)
def test_float64(step):
    theirs, ours = make_pair(step=step, dtype="float64", pre_act_loss_coefficient=1e-2, jumprelu_ste_to_input=True)
    x = batch(dtype=torch.float64)
    assert_same_step(*step_of(theirs, x, dead_mask()), *step_of(ours, x, dead_mask()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_autocast_bf16_dense(mode):
    """SAETrainer's autocast (bf16 products, fp32 weights and θ): hidden_pre is fp32 there
    (bf16 product + fp32 b_enc), the op computes in it, and the step equals SAELens's."""
    theirs, ours = make_pair(step="dense", **mode)
    x = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs_step = step_of(theirs, x)
        ours_step = step_of(ours, x)
    assert_same_step(*theirs_step, *ours_step)


@pytest.mark.parametrize("mode", MODES)
def test_autocast_bf16_sparse(mode):
    """The sparse step under autocast forms pre in one bf16 product with b_enc (SAELens: a bf16
    product, then + b_enc in fp32) and decodes in fp32 (SAELens: a bf16 product): both round pre
    at bf16 resolution, at different points, so entries within a bf16 ulp of θ or of the window's
    edges can decide differently (docs/saelens.md#precision). Measured (1,024 rows): losses within
    0.1%, the θ gradient within about 2% in norm, the others within 1%; held to bf16 tolerance on
    the losses and 5% in norm."""
    theirs, ours = make_pair(step="sparse", **mode)
    x = batch(rows=1024)  # the differing decisions average out over rows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs_out, theirs_grads = step_of(theirs, x)
        ours_out, ours_grads = step_of(ours, x)
    for name, value in theirs_out.losses.items():
        close(ours_out.losses[name], value, 2e-2, 2e-2, name)
    for name, grad in theirs_grads.items():
        assert ours_grads[name].dtype == grad.dtype
        assert relative_error(ours_grads[name], grad) < 0.05, name


@pytest.mark.parametrize("step", STEPS)
def test_bfloat16_weights(step):
    """dtype="bfloat16": SAELens computes the rectangle window in bf16 ((pre − θ)/ε rounded to 8
    bits), the ops in fp32 (docs/saelens.md#precision): the few entries within a bf16 ulp of the
    window's edges can decide differently, so the θ gradient agrees to bf16 tolerance."""
    theirs, ours = make_pair(step=step, dtype="bfloat16")
    assert ours.threshold.dtype == torch.float32  # SAELens keeps θ in fp32 whatever the dtype
    x = batch(dtype=torch.bfloat16)
    theirs_out, theirs_grads = step_of(theirs, x)
    ours_out, ours_grads = step_of(ours, x)
    for name, value in theirs_out.losses.items():
        close(ours_out.losses[name], value, 2e-2, 2e-2, name)
    for name, grad in theirs_grads.items():
        assert ours_grads[name].dtype == grad.dtype
        assert relative_error(ours_grads[name], grad) < 0.05, name


def test_threshold_is_projected_non_negative_as_in_saelens():
    theirs, ours = make_pair()
    with torch.no_grad():
        theirs.threshold[:10] = -0.5
    ours.load_state_dict(theirs.state_dict())
    x = batch()
    assert_same_step(*step_of(theirs, x), *step_of(ours, x))
    assert torch.equal(ours.threshold, theirs.threshold)
    assert ours.threshold.min().item() == 0.0


def test_encode_and_forward_equal_saelens():
    theirs, ours = make_pair(jumprelu_ste_to_input=True)
    x = batch()
    with torch.no_grad():
        assert torch.equal(ours.encode(x), theirs.encode(x))
        assert torch.equal(ours(x), theirs(x))
    # and the encoder's gradients (encode_with_hidden_pre is what SAELens's own step calls)
    g = torch.Generator().manual_seed(5)
    grad = torch.randn(ROWS, D_SAE, generator=g)
    for sae in (theirs, ours):
        sae.zero_grad()
        (sae.encode(x) * grad).sum().backward()
    for name, p in theirs.named_parameters():
        if p.grad is not None:
            close(dict(ours.named_parameters())[name].grad, p.grad, 1e-5, 1e-6, name)


def test_window_edges_decide_as_saelens():
    """SAELens's rectangle((pre − θ)/ε) (open at both ends, a true division) and the ops' window
    decide alike on the ulps around both edges, so the θ gradients are equal entry for entry."""
    g = torch.Generator().manual_seed(0)
    theta = 0.05 + torch.rand(D_SAE, generator=g)
    for eps in (0.001, 0.05, 0.2, 0.0123):
        rows = []
        for edge in (theta + eps / 2, theta - eps / 2):
            for direction in (float("inf"), float("-inf")):
                x = edge.clone()
                for _ in range(5):
                    rows.append(x)
                    x = torch.nextafter(x, torch.full_like(x, direction))
        pre = torch.stack(rows)
        grad = torch.ones_like(pre)
        theirs, ours = [], []
        for op in ("saelens", "ours"):
            p, t = pre.clone().requires_grad_(), theta.clone().requires_grad_()
            if op == "saelens":
                from sae_lens.saes.jumprelu_sae import JumpReLU, Step

                acts, l0 = JumpReLU.apply(p, t, eps, True), Step.apply(p, t, eps, True).sum(-1)
            else:
                acts, l0 = plugin.jumprelu_l0(p, t, eps, True)
            torch.autograd.backward((acts, l0), (grad, torch.ones(len(rows))))
            (theirs if op == "saelens" else ours).extend([acts.detach(), l0.detach(), p.grad, t.grad])
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --- registration, saving, fallbacks -------------------------------------------------------------


def test_registered_on_import():
    assert get_sae_training_class("jumprelu_ext") == (JumpReLUExtTrainingSAE, JumpReLUExtTrainingSAEConfig)
    sae = TrainingSAE.from_dict(
        TrainingSAEConfig.from_dict({"architecture": "jumprelu_ext", "d_in": 8, "d_sae": 16}).to_dict()
    )
    assert type(sae) is JumpReLUExtTrainingSAE
    assert isinstance(sae, JumpReLUTrainingSAE)
    # training checkpoints say "jumprelu_ext"; SAE.load_from_disk reads them as the stock SAE
    assert get_sae_class("jumprelu_ext")[0].__name__ == "JumpReLUSAE"


def test_registering_again_is_idempotent_and_conflicts_are_refused():
    plugin._register()
    saved = SAE_TRAINING_CLASS_REGISTRY["jumprelu_ext"]
    try:
        SAE_TRAINING_CLASS_REGISTRY["jumprelu_ext"] = (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig)
        with pytest.raises(ValueError, match="already registered"):
            plugin._register()
    finally:
        SAE_TRAINING_CLASS_REGISTRY["jumprelu_ext"] = saved


def test_inference_config_is_stock_jumprelu():
    _, ours = make_pair(jumprelu_ste_to_input=True, jumprelu_sparsity_loss_mode="tanh")
    inference = ours.cfg.get_inference_sae_cfg_dict()
    assert inference["architecture"] == "jumprelu"
    assert "jumprelu_ext_step" not in inference
    assert inference["metadata"]["training_architecture"] == "jumprelu_ext"
    details = inference["metadata"]["training_architecture_details"]
    assert details["jumprelu_sparsity_loss_mode"] == "tanh" and details["jumprelu_ext_step"] == "dense"
    assert ours.cfg.to_dict()["architecture"] == "jumprelu_ext"


def test_bad_step_option_is_refused():
    with pytest.raises(ValueError, match="jumprelu_ext_step"):
        JumpReLUExtTrainingSAEConfig(d_in=4, d_sae=8, jumprelu_ext_step="fast")


def test_fingerprints_match_the_installed_saelens():
    """The installed sae-lens is the verified one (if this fails after upgrading sae-lens, the
    plugin runs SAELens's own code: re-verify with this file, then update SAELENS_FINGERPRINTS)."""
    assert plugin.saelens_code_changed() == []
    # formatting, comments and docstrings do not change a fingerprint; code does
    src_a = "def f(x):\n    '''doc'''\n    return x + 1  # one\n"
    src_b = "def f(x):\n\n    return (x +\n            1)\n"
    src_c = "def f(x):\n    return x + 2\n"
    digests = [plugin._canonical(plugin._strip_docstrings(ast.parse(src))) for src in (src_a, src_b, src_c)]
    assert digests[0] == digests[1] != digests[2]


@pytest.fixture
def fresh_log(monkeypatch, caplog):
    monkeypatch.setattr(plugin, "_said", set())
    caplog.set_level(logging.WARNING, logger="jumprelu_ext.saelens")
    return caplog


def test_changed_saelens_code_runs_saelens_own_step(monkeypatch, fresh_log):
    """A SAELens whose JumpReLU code differs from the verified one: its own code, said once."""
    from sae_lens.saes import jumprelu_sae

    calls = []
    original = jumprelu_sae.Step.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(plugin, "_CHANGED", ["jumprelu_sae.Step"])
    monkeypatch.setattr(jumprelu_sae.Step, "apply", counting)
    theirs, ours = make_pair()
    x = batch()
    assert_same_step(*step_of(theirs, x), *step_of(ours, x))
    assert len(calls) == 2  # SAELens's Step ran for both
    ours_out, _ = step_of(ours, x)
    assert "jumprelu_ext/sparse_step" not in ours_out.metrics


def test_unservable_bandwidth_falls_back_once(fresh_log):
    # below float32's normal range: the ops refuse it (SAELens divides by it regardless)
    theirs, ours = make_pair(jumprelu_bandwidth=1e-39)
    x = batch()
    for _ in range(2):
        assert_same_step(*step_of(theirs, x), *step_of(ours, x))
    messages = [r.getMessage() for r in fresh_log.records]
    assert len(messages) == 1 and "jumprelu_bandwidth" in messages[0] and "SAELens's own" in messages[0]


def test_hooks_keep_the_step_dense(fresh_log):
    theirs, ours = make_pair(step="sparse")
    seen = []
    ours.hook_sae_acts_post.add_hook(lambda acts, hook: seen.append(acts.shape))
    theirs.hook_sae_acts_post.add_hook(lambda acts, hook: None)
    x = batch()
    theirs_step, ours_step = step_of(theirs, x), step_of(ours, x)
    assert_same_step(*theirs_step, *ours_step)
    assert seen == [(ROWS, D_SAE)] and ours_step[0].metrics["jumprelu_ext/sparse_step"] == 0.0
    assert "hook_sae_acts_post have hooks" in fresh_log.records[0].getMessage()


def test_auto_moves_to_the_sparse_step_when_the_support_is_small():
    theirs, ours = make_pair(step="auto")
    with torch.no_grad():
        theirs.threshold.fill_(3.0)  # few active, few in the window
    ours.load_state_dict(theirs.state_dict())
    x = batch()
    first, _ = step_of(ours, x)
    assert first.metrics["jumprelu_ext/sparse_step"] == 0.0  # auto starts dense, measures
    assert first.metrics["jumprelu_ext/support_density"] < 0.05
    second = step_of(ours, x)
    assert second[0].metrics["jumprelu_ext/sparse_step"] == 1.0
    assert_same_step(*step_of(theirs, x), *second)
