"""Several SAEs from one stream: a list of values for --l0-coefficient or --target-l0 trains one
SAE per value on the same batches, each equal (bitwise, on the CPU) to the single run with that
value; with files and with a streamed model, after a kill and --resume, under torchrun; a list
for any other option is a one-line error."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_distributed import torchrun
from test_train import Killed, _kill, _signal_at_batch, small_run_flags

from jumprelu_ext.export import load_sae
from jumprelu_ext.train import loop as train
from jumprelu_ext.train.errors import run_cli

D_IN = 16
LAMBDAS = ("1e-3", "1e-1")
MEMBER_FILES = ("cfg.json", "sae_weights.safetensors", "eval.json", "metrics.jsonl", "density.png", "curves.png")
# Per-run timing and memory differ between any two runs; every other logged number must not.
TIMING = ("tokens_per_s", "peak_memory_mib", "train_tokens_per_s")


@pytest.fixture(scope="module")
def activations(tmp_path_factory):
    x = np.random.default_rng(0).normal(size=(1000, D_IN)).astype(np.float32) * 3.0 + 1.0
    path = tmp_path_factory.mktemp("data") / "acts.npy"
    np.save(path, x)
    return path


def sweep_flags(activations, out, *extra):
    return small_run_flags(activations, out, "--checkpoint-every", "3", *extra)


@pytest.fixture(scope="module")
def singles(activations, tmp_path_factory):
    """The single run of each λ."""
    root = tmp_path_factory.mktemp("singles")
    for value in LAMBDAS:
        assert train.main(sweep_flags(activations, root / value, "--l0-coefficient", value)) == 0
    return {float(value): root / value for value in LAMBDAS}


@pytest.fixture(scope="module")
def sweep(activations, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "run"
    assert train.main(sweep_flags(activations, out, "--l0-coefficient", ",".join(LAMBDAS))) == 0
    return out


def assert_bitwise_equal(ours, reference):
    a, b = load_file(ours / "sae_weights.safetensors"), load_file(reference / "sae_weights.safetensors")
    assert set(a) == set(b)
    for name in b:
        assert torch.equal(a[name], b[name]), (ours, name)


def metrics(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def evaluation(folder):
    results = json.loads((folder / "eval.json").read_text())
    return {k: v for k, v in results.items() if k not in TIMING}


@pytest.mark.slow
def test_each_sae_of_a_sweep_is_the_single_run_with_its_value(sweep, singles):
    for value, single in singles.items():
        folder = sweep / f"l0_coefficient-{value:g}"
        for name in MEMBER_FILES:
            assert (folder / name).is_file(), (folder, name)
        assert_bitwise_equal(folder, single)
        assert metrics(folder) == metrics(single)
        assert evaluation(folder) == evaluation(single)
        cfg = json.loads((folder / "cfg.json").read_text())["jumprelu_ext"]["extra"]["training_config"]
        assert cfg["l0_coefficient"] == value and cfg["out"] == str(folder)
        load_sae(folder)  # the SAELens-layout folder loads
    assert not (sweep / "sae_weights.safetensors").exists()  # the SAEs live in their folders only


@pytest.mark.slow
def test_a_sweep_writes_a_summary_and_a_frontier(sweep, singles):
    rows = json.loads((sweep / "summary.json").read_text())
    assert [row["name"] for row in rows] == [f"l0_coefficient-{float(v):g}" for v in LAMBDAS]
    for row in rows:
        single = evaluation(singles[row["l0_coefficient"]])
        assert row["l0"] == single["l0"] and row["fvu"] == single["fvu"]
        assert row["dead_fraction"] == single["dead_fraction"]
    assert rows[0]["l0"] > rows[-1]["l0"]  # a larger λ, a sparser SAE
    assert (sweep / "frontier.png").stat().st_size > 0
    assert (sweep / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_a_target_l0_sweep_equals_its_single_runs(activations, tmp_path):
    steer = ["--l0-coefficient", "1e-2", "--threshold-param", "raw"]
    assert train.main(sweep_flags(activations, tmp_path / "sweep", *steer, "--target-l0", "5,12")) == 0
    for target in ("5", "12"):
        assert train.main(sweep_flags(activations, tmp_path / target, *steer, "--target-l0", target)) == 0
        assert_bitwise_equal(tmp_path / "sweep" / f"target_l0-{target}", tmp_path / target)
        assert metrics(tmp_path / "sweep" / f"target_l0-{target}") == metrics(tmp_path / target)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "kill"])
def test_a_sweep_stopped_between_checkpoints_resumes_every_sae_exactly(
    activations, singles, tmp_path, monkeypatch, how
):
    import os
    import signal

    flags = sweep_flags(activations, tmp_path / "run", "--l0-coefficient", ",".join(LAMBDAS))
    with monkeypatch.context() as patch:
        if how == "sigterm":  # finishes step 5, checkpoints every SAE, exits
            _signal_at_batch(patch, 5, lambda: os.kill(os.getpid(), signal.SIGTERM))
            assert train.main(flags) == 128 + signal.SIGTERM
        else:  # killed during step 5: every SAE resumes from step 3
            _signal_at_batch(patch, 5, _kill)
            with pytest.raises(Killed):
                train.main(flags)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == (5 if how == "sigterm" else 3)
    assert sorted(state["members"]) == sorted(f"l0_coefficient-{float(v):g}" for v in LAMBDAS)
    assert train.main(flags + ["--resume"]) == 0
    for value, single in singles.items():
        folder = tmp_path / "run" / f"l0_coefficient-{value:g}"
        assert_bitwise_equal(folder, single)
        assert [row["step"] for row in metrics(folder)] == [2, 4, 6, 8, 10, 12]


def test_the_table_stars_a_lambda_that_was_still_warming_up(tmp_path):
    """A --sparsity-warmup-steps longer than the run (given, or --recipe paper's) ends short of λ:
    the table says so instead of showing the reduced value as if it were the one asked for."""
    from types import SimpleNamespace

    from jumprelu_ext.train.config import TrainConfig
    from jumprelu_ext.train.report.sweep import sweep_summary, sweep_table
    from jumprelu_ext.train.sparsity import sparsity_coefficient

    members = []
    for value, warmup in ((2e-3, 200), (4e-3, 100)):
        cfg = TrainConfig(activations="a.npy", steps=150, l0_coefficient=value, sparsity_warmup_steps=warmup)
        members.append(
            SimpleNamespace(name=f"l0_coefficient-{value:g}", cfg=cfg, coefficient=sparsity_coefficient(cfg))
        )
    results = {
        "steps": 150,
        "l0": 20.0,
        "fvu": 0.2,
        "mse": 0.1,
        "dead_fraction": 0.0,
        "dense_fraction": 0.0,
        "tokens": 9,
    }
    rows = sweep_summary(members, [results, results], "l0_coefficient")
    assert [row["l0_coefficient_warming_up"] for row in rows] == [True, False]
    lines = sweep_table(rows, tmp_path).splitlines()
    assert lines[2].split()[:2] == ["l0_coefficient-0.002", "0.0015*"]  # 150 of 200 warm-up steps: 75%
    assert lines[3].split()[:2] == ["l0_coefficient-0.004", "0.004"]
    assert "* still warming up at the last step" in lines[4]


def cli(argv, capsys):
    capsys.readouterr()
    status = run_cli(train.main, argv)
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.slow
def test_resume_and_overwrite_know_the_sweep(activations, sweep, tmp_path, capsys):
    other = ["--l0-coefficient", "1e-3,5e-2"]
    status, err = cli(sweep_flags(activations, sweep, *other), capsys)
    assert status == 2 and len(err) == 1 and "already holds a run" in err[0], err
    status, err = cli(sweep_flags(activations, sweep, *other, "--resume"), capsys)
    assert status == 2 and len(err) == 1, err
    assert (
        "trains l0_coefficient-0.001, l0_coefficient-0.1, this run l0_coefficient-0.001, l0_coefficient-0.05" in err[0]
    )
    status, err = cli(sweep_flags(activations, sweep, "--resume"), capsys)  # a single run on a sweep
    assert status == 2 and "this run one SAE" in err[0], err

    out = tmp_path / "run"
    assert train.main(sweep_flags(activations, out, "--l0-coefficient", "1e-3,2e-2", "--steps", "2")) == 0
    status, err = cli(sweep_flags(activations, out, "--steps", "2", "--overwrite"), capsys)
    assert status == 0, err
    assert not (out / "summary.json").exists()  # the old sweep's files are gone, its SAEs' too
    assert not (out / "l0_coefficient-0.001" / "sae_weights.safetensors").exists()
    assert (out / "sae_weights.safetensors").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "1e-3,2e-3"], "error: --lr takes one value, got '1e-3,2e-3'"),
        (["--steps", "10,20"], "error: --steps takes one value, got '10,20'"),
        (["--l0-coefficient", "1e-3,1e-3"], "error: --l0-coefficient lists a value twice: 0.001,0.001"),
        (
            ["--l0-coefficient", "1,2", "--target-l0", "5,6"],
            "error: give a list to one of --l0-coefficient and --target-l0",
        ),
        (["--l0-coefficient", "1e-3,-1"], "error: --l0-coefficient must be >= 0, got -1.0"),
    ],
)
def test_a_list_where_one_value_goes_is_one_line_and_exit_2(activations, tmp_path, capsys, argv, message):
    status, err = cli(small_run_flags(activations, tmp_path / "o", *argv), capsys)
    assert status == 2 and len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: [1.0e-3, 2.0e-3]\n", "lr (--lr) takes one value, got [0.001, 0.002]"),
        ("batch_size: 32,64\n", "batch_size (--batch-size) takes one value, got ['32', '64']"),
    ],
)
def test_a_list_in_the_config_file_is_one_line_and_exit_2(activations, tmp_path, capsys, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    status, err = cli(small_run_flags(activations, tmp_path / "o", "--config", str(config)), capsys)
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.slow
def test_a_config_file_list_sweeps(activations, sweep, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"l0_coefficient": [float(v) for v in LAMBDAS]}))
    assert train.main(sweep_flags(activations, tmp_path / "run", "--config", str(config), "--steps", "2")) == 0
    assert len(json.loads((tmp_path / "run" / "summary.json").read_text())) == len(LAMBDAS)


def model_flags(tiny, out, *extra):
    from test_stream import model_flags as stream_flags

    return stream_flags(tiny, out, "--steps", "16", "--log-every", "8", *extra)


@pytest.mark.slow
def test_a_streamed_sweep_stopped_and_resumed_equals_its_single_runs(tiny, tmp_path, monkeypatch):
    """The model's activations are harvested once, in fills shared by both SAEs; stopped at step
    10, between checkpoints (every 7 steps) and inside a fill, the sweep resumes exactly."""
    import os
    import signal

    from jumprelu_ext.train.data.stream import StreamedBatches

    flags = model_flags(tiny, tmp_path / "sweep", "--l0-coefficient", "1e-2,3e-1")
    with monkeypatch.context() as patch:
        _signal_at_batch(patch, 10, lambda: os.kill(os.getpid(), signal.SIGTERM), stream=StreamedBatches)
        assert train.main(flags) == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "sweep" / "checkpoint.pt", weights_only=True)["step"] == 10
    assert train.main(flags + ["--resume"]) == 0
    for value in ("0.01", "0.3"):
        assert train.main(model_flags(tiny, tmp_path / value, "--l0-coefficient", value)) == 0
        folder = tmp_path / "sweep" / f"l0_coefficient-{value}"
        assert_bitwise_equal(folder, tmp_path / value)
        assert evaluation(folder) == evaluation(tmp_path / value)  # the downstream cost included
    rows = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert all("delta_ce" in row for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["data-parallel", "sharded"])
def test_a_sweep_under_torchrun_equals_the_single_process_sweep(activations, sweep, tmp_path, layout):
    out = tmp_path / layout
    extra = ["--shard-features"] if layout == "sharded" else []
    result = torchrun(2, sweep_flags(activations, out, "--l0-coefficient", ",".join(LAMBDAS), *extra))
    assert result.stdout.count("SAEs trained on the same batches") == 1  # one table, from rank 0
    for value in LAMBDAS:
        name = f"l0_coefficient-{float(value):g}"
        ours, reference = (load_file(d / name / "sae_weights.safetensors") for d in (out, sweep))
        for key in reference:
            torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
        for key in ("l0", "fvu", "dead_fraction"):
            np.testing.assert_allclose(evaluation(out / name)[key], evaluation(sweep / name)[key], rtol=1e-4)
