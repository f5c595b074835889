"""The trainer end to end on activation files: outputs, resume after a signal or a kill, CLI errors."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from jumprelu_ext.export import load_sae
from jumprelu_ext.train import loop as train
from jumprelu_ext.train.data.activations import ShuffledBatches
from jumprelu_ext.train.errors import UserError

# Training runs, resumed runs and the CLI in subprocesses.
pytestmark = pytest.mark.slow

D_IN = 16


SMALL_RUN = (
    "--d-sae 32 --batch-size 64 --steps 12 --lr 1e-3 --lr-warmup-steps 2 --sparsity-warmup-steps 4 "
    "--threshold-lr 1e-2 --init-threshold 0.05 --bandwidth 0.05 --log-every 2 --device cpu"
).split()


def small_run_flags(activations, out, *extra):
    return ["--activations", str(activations), "--out", str(out), *SMALL_RUN, *extra]


@pytest.fixture
def activations(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, D_IN)).astype(np.float32) * 3.0 + 1.0
    path = tmp_path / "acts.npy"
    np.save(path, x)
    return path


def test_run_writes_the_sae_and_report(activations, tmp_path):
    out = tmp_path / "run"
    assert train.main(small_run_flags(activations, out)) == 0
    for name in ("cfg.json", "sae_weights.safetensors", "eval.json", "metrics.jsonl", "density.png", "curves.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "eval.json").read_text())
    for key in ("l0", "fvu", "mse", "dead_fraction", "dense_fraction"):
        assert np.isfinite(results[key]), key
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert rows[0]["l0_coefficient"] < rows[-1]["l0_coefficient"]  # λ warm-up
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_in"] == D_IN and cfg["d_sae"] == 32
    assert set(load_file(out / "sae_weights.safetensors")) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}

    # The saved SAE takes raw activations: its metrics on raw x match eval.json's on scaled x.
    sae = load_sae(out)
    x = torch.from_numpy(np.load(activations))
    out_raw = sae(x)
    fired = (out_raw.acts != 0).float().sum(-1).mean().item()
    assert 0 < fired < 32
    scale = cfg["jumprelu_ext"]["input_scale"]
    np.testing.assert_allclose(scale, 1 / np.sqrt((x.double() ** 2).sum(-1).mean().item()), rtol=0.05)


def _signal_at_batch(monkeypatch, batch_number, action, stream=ShuffledBatches):
    """Make the data stream (of class ``stream``) run ``action`` when it hands out batch
    ``batch_number`` (1-based)."""
    original = stream.__next__
    count = {"n": 0}

    def next_batch(self):
        count["n"] += 1
        if count["n"] == batch_number:
            action()
        return original(self)

    monkeypatch.setattr(stream, "__next__", next_batch)


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in the trainer catches it, nothing is saved."""


def _kill():
    raise Killed


@pytest.mark.parametrize(
    "how, options",
    [
        ("sigterm", []),
        ("kill", []),
        ("kill", ["--target-l0", "5", "--l0-coefficient", "1e-2", "--threshold-param", "raw"]),
    ],
    ids=["sigterm", "kill", "kill-target-l0-raw"],
)
def test_interrupted_run_resumes_to_the_same_weights(activations, tmp_path, monkeypatch, how, options):
    reference_out, out = tmp_path / "uninterrupted", tmp_path / "interrupted"
    assert train.main(small_run_flags(activations, reference_out, *options)) == 0

    flags = small_run_flags(activations, out, "--checkpoint-every", "3", *options)
    with monkeypatch.context() as patch:
        if how == "sigterm":  # a real signal through the trainer's handler: it finishes step 5, saves, exits
            _signal_at_batch(patch, 5, lambda: os.kill(os.getpid(), signal.SIGTERM))
            assert train.main(flags) == 128 + signal.SIGTERM
            assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 5
        else:  # killed during step 5: the last checkpoint is step 3's
            _signal_at_batch(patch, 5, _kill)
            with pytest.raises(Killed):
                train.main(flags)
            assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    assert train.main(flags + ["--resume"]) == 0

    ours, reference = load_file(out / "sae_weights.safetensors"), load_file(reference_out / "sae_weights.safetensors")
    for name in reference:
        assert torch.equal(ours[name], reference[name]), name
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12]  # rows after the checkpoint were dropped and logged again


def test_a_resumed_run_keeps_the_warmups_it_started_with(activations, tmp_path):
    """Unset warm-ups are fitted to --steps (6 steps: lr 0, λ 2); extended to 12 steps, the run
    keeps them rather than refitting (lr 1, λ 4), which would lower λ in the middle of the run."""
    out = tmp_path / "run"
    unset = [flag for i, flag in enumerate(SMALL_RUN) if "warmup" not in flag and "warmup" not in SMALL_RUN[i - 1]]
    flags = ["--activations", str(activations), "--out", str(out), *unset, "--checkpoint-every", "3"]
    assert train.main([*flags, "--steps", "6"]) == 0
    assert train.main([*flags, "--steps", "12", "--resume"]) == 0
    trained = json.loads((out / "cfg.json").read_text())["jumprelu_ext"]["extra"]["training_config"]
    assert (trained["steps"], trained["lr_warmup_steps"], trained["sparsity_warmup_steps"]) == (12, 0, 2)
    lambdas = [json.loads(line)["l0_coefficient"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lambdas == sorted(lambdas) and lambdas[-1] == 1.0  # never lowered


def run_cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "jumprelu_ext.train", *args], capture_output=True, text=True, env=env, timeout=120
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def test_cli_errors_are_one_line(tmp_path, activations):
    nan_rows = np.full((50, D_IN), np.nan, dtype=np.float32)
    np.save(tmp_path / "nan.npy", nan_rows)
    (tmp_path / "empty.npy").write_bytes(b"")
    out = str(tmp_path / "o")
    cases = [
        (["--activations", str(tmp_path / "missing.npy"), "--out", out], ["missing.npy", "no such file"]),
        (["--activations", str(tmp_path / "empty.npy"), "--out", out], ["empty.npy", "empty"]),
        (["--activations", str(tmp_path / "nan.npy"), "--out", out, "--batch-size", "8"], ["NaN"]),
        (["--activations", str(activations), "--out", out, "--lr", "-1"], ["--lr"]),
        (["--activations", str(activations), "--out", out, "--device", "cuda:7"], ["--device"]),
        (["--activations", str(activations), "--model", "gpt2", "--out", out], ["--activations", "--model"]),
        (["--config", str(tmp_path / "nope.yaml")], ["nope.yaml"]),
    ]
    for args, fragments in cases:
        assert_one_line_error(run_cli(*args), *fragments)


def test_resume_refuses_a_different_run(activations, tmp_path):
    out = tmp_path / "run"
    assert train.main(small_run_flags(activations, out, "--steps", "2")) == 0
    result = run_cli(*small_run_flags(activations, out, "--resume", "--d-sae", "48"))
    assert_one_line_error(result, "--resume", "--d-sae")


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(activations, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(small_run_flags(activations, out, "--steps", "6")) == 0
    report = {name: (out / name).read_bytes() for name in ("cfg.json", "eval.json", "metrics.jsonl")}
    result = run_cli(*small_run_flags(activations, out, "--resume", "--steps", "4"))
    assert_one_line_error(result, "--resume", "at step 6, past --steps 4", "give --steps 6 or more")
    assert {name: (out / name).read_bytes() for name in report} == report  # the report still tells the truth
    capsys.readouterr()
    assert train.main(small_run_flags(activations, out, "--resume", "--steps", "6")) == 0
    assert "at step 6: the run is done, so it is only evaluated again" in capsys.readouterr().out


def test_a_target_l0_above_the_width_the_data_gives_is_refused(activations, tmp_path):
    flags = small_run_flags(activations, tmp_path / "run", "--target-l0", "40", "--l0-coefficient", "1e-3")
    flags[flags.index("--d-sae") : flags.index("--d-sae") + 2] = ["--expansion-factor", "2"]  # 2 x 16 features
    with pytest.raises(UserError, match=r"^--target-l0 40 must be below the SAE's 32 features"):
        train.main(flags)


def test_help_lists_the_contract_flags():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in (
        "--activations",
        "--model",
        "--layer",
        "--dataset",
        "--context-length",
        "--d-sae",
        "--expansion-factor",
        "--steps",
        "--batch-size",
        "--lr",
        "--lr-warmup-steps",
        "--l0-coefficient",
        "--sparsity-warmup-steps",
        "--bandwidth",
        "--init-threshold",
        "--device",
        "--dtype",
        "--seed",
        "--out",
        "--checkpoint-every",
        "--resume",
        "--threshold-lr",
        "--threshold-param",
        "--sparsity-loss",
        "--pre-act-loss-coefficient",
        "--config",
    ):
        assert flag in result.stdout, flag


@pytest.fixture(scope="module")
def tiny_gpt2_and_text(tiny_gpt2_folder, tmp_path_factory):
    """The tiny GPT-2 folder (2 blocks, width 32) and a text file of its corpus."""
    from _tiny_models import CORPUS

    text = tmp_path_factory.mktemp("text") / "text.txt"
    text.write_text("\n\n".join(CORPUS * 20))
    return tiny_gpt2_folder, text


def test_trains_from_a_model_and_reports_the_downstream_cost(tmp_path, tiny_gpt2_and_text):
    model, text = tiny_gpt2_and_text
    out = tmp_path / "run"
    flags = [
        "--model",
        str(model),
        "--layer",
        "0",
        "--dataset",
        str(text),
        "--context-length",
        "32",
        "--d-sae",
        "64",
        "--batch-size",
        "128",
        "--steps",
        "20",
        "--log-every",
        "10",
        "--threshold-lr",
        "1e-2",
        "--lr",
        "1e-3",
        "--lr-warmup-steps",
        "2",
        "--sparsity-warmup-steps",
        "5",
        "--out",
        str(out),
        "--eval-fraction",
        "0.2",
        "--device",
        "cpu",
    ]
    assert train.main(flags) == 0
    results = json.loads((out / "eval.json").read_text())
    downstream = results["downstream"]
    assert downstream["kind"] == "causal_lm"
    assert np.isclose(downstream["delta_ce"], downstream["ce_spliced"] - downstream["ce_clean"])
    metadata = json.loads((out / "cfg.json").read_text())["metadata"]
    assert metadata["hook_name"] == "transformer.h.0" and metadata["hook_layer"] == 0


def test_model_errors_are_one_line(tmp_path, tiny_gpt2_and_text):
    model, text = tiny_gpt2_and_text
    common = ["--dataset", str(text), "--out", str(tmp_path / "o")]
    assert_one_line_error(run_cli("--model", str(model), "--layer", "5", *common), "--layer 5", "2 layers")
    assert_one_line_error(run_cli("--model", str(tmp_path / "nope"), "--layer", "0", *common), "nope")
    assert_one_line_error(
        run_cli("--model", str(model), "--layer", "0", "--dataset", str(tmp_path / "none.txt"), "--out", "o"),
        "none.txt",
    )


@pytest.mark.parametrize("command", ["jumprelu_ext.train", "jumprelu_ext.harvest", "jumprelu_ext.cache"])
def test_text_that_is_not_utf8_is_one_line_naming_the_byte(tmp_path, tiny_gpt2_and_text, command):
    """A Latin-1 document after UTF-8 ones: met after the start-up check of the first document."""
    model, text = tiny_gpt2_and_text
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(text.read_bytes() + "\n\ncafé au lait\n".encode("latin-1"))
    args = ["--model", str(model), "--layer", "0", "--dataset", str(latin1), "--out", str(tmp_path / "o")]
    result = subprocess.run(
        [sys.executable, "-m", command, *args, "--device", "cpu"], capture_output=True, text=True, timeout=120
    )
    offset = len(text.read_bytes()) + len("\n\ncaf")
    assert_one_line_error(result, str(latin1), "not UTF-8", f"byte 0xe9 at offset {offset}")


def test_trains_on_shards_written_by_python_m_jumprelu_ext_harvest(tmp_path, tiny_gpt2_and_text):
    from jumprelu_ext import harvest

    model, text = tiny_gpt2_and_text
    shards = tmp_path / "shards"
    harvest.main(
        [
            "--model",
            str(model),
            "--layer",
            "1",
            "--dataset",
            str(text),
            "--context-length",
            "32",
            "--out",
            str(shards),
            "--shard-tokens",
            "500",
            "--device",
            "cpu",
        ]
    )
    assert len(list(shards.glob("*.safetensors"))) > 1
    out = tmp_path / "run"
    assert train.main(small_run_flags(shards, out)) == 0
    assert json.loads((out / "cfg.json").read_text())["d_in"] == 32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_run_and_resume(activations, tmp_path, dtype):
    out = tmp_path / "run"
    # Later flags win: this runs on CUDA, first to step 6, then resumed to step 12.
    flags = small_run_flags(activations, out, "--checkpoint-every", "3", "--device", "cuda", "--dtype", dtype)
    assert train.main(flags + ["--steps", "6"]) == 0
    assert train.main(flags + ["--resume"]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["steps"] == 12 and np.isfinite(results["fvu"])
    sae = load_sae(out)
    assert torch.isfinite(sae.threshold).all()


def test_tensorboard_gets_the_logged_rows(activations, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert train.main(small_run_flags(activations, out, "--tensorboard")) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "l0", "fvu"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [r["step"] for r in rows], key
        np.testing.assert_allclose([e.value for e in logged], [r[key] for r in rows], rtol=1e-6, err_msg=key)


def test_a_missing_logging_package_is_reported_before_any_work(activations, tmp_path):
    # wandb may be installed (sae-lens brings it): a wandb.py first on the path that fails to
    # import stands for its absence.
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "wandb.py").write_text("raise ImportError('No module named wandb (blocked by the test)')\n")
    path = os.pathsep.join(p for p in (str(blocker), os.environ.get("PYTHONPATH")) if p)
    result = run_cli(
        "--activations",
        str(activations),
        "--out",
        str(tmp_path / "o"),
        "--wandb",
        "project",
        env_extra={"PYTHONPATH": path},
    )
    assert_one_line_error(result, "--wandb", "pip install wandb")
    assert "training on" not in result.stdout  # nothing was loaded or trained first
