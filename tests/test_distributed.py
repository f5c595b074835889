"""torchrun on CPU (gloo, 2 processes): data-parallel and feature-sharded runs equal a
single-process run over the same batches, and checkpoints move between world sizes."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from jumprelu_ext.train import distributed
from jumprelu_ext.train import loop as train

# torchrun: every test starts two or more processes and trains.
pytestmark = pytest.mark.slow

D_IN, D_SAE = 16, 32


@pytest.fixture(scope="module")
def activations(tmp_path_factory):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, D_IN)).astype(np.float32) * 2.0 + 0.5
    x[[5, 300, 1999]] = np.nan  # dropped rows must not break the equality
    path = tmp_path_factory.mktemp("data") / "acts.npy"
    np.save(path, x)
    return path


def flags(activations, out, *extra):
    return [
        "--activations",
        str(activations),
        "--out",
        str(out),
        "--d-sae",
        str(D_SAE),
        "--batch-size",
        "128",
        "--steps",
        "12",
        "--lr",
        "1e-3",
        "--lr-warmup-steps",
        "2",
        "--sparsity-warmup-steps",
        "4",
        "--threshold-lr",
        "1e-2",
        "--init-threshold",
        "0.05",
        "--bandwidth",
        "0.05",
        "--log-every",
        "4",
        "--checkpoint-every",
        "3",
        "--device",
        "cpu",
        "--sparsity-loss",
        "tanh",
        "--pre-act-loss-coefficient",
        "0.01",
        *extra,
    ]


def torchrun(nproc, args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "jumprelu_ext.train",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def weights(out):
    return load_file(out / "sae_weights.safetensors")


def assert_same_sae(a, b):
    wa, wb = weights(a), weights(b)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(activations, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    assert train.main(flags(activations, out)) == 0
    return out


@pytest.mark.parametrize("layout", ["data-parallel", "sharded"])
def test_two_ranks_equal_one_process(activations, single, tmp_path, layout):
    out = tmp_path / layout
    result = torchrun(2, flags(activations, out, *(["--shard-features"] if layout == "sharded" else [])))
    assert result.stdout.count("evaluation on") == 1  # reports come from rank 0 only
    assert_same_sae(out, single)
    ours, reference = metrics(out), metrics(single)
    assert [r["step"] for r in ours] == [r["step"] for r in reference]
    for key in ("loss", "mse", "l0", "fvu", "threshold_mean", "dead_fraction", "dropped_rows"):
        np.testing.assert_allclose([r[key] for r in ours], [r[key] for r in reference], rtol=1e-4, err_msg=key)
    evaluation, reference_eval = (json.loads((d / "eval.json").read_text()) for d in (out, single))
    for key in ("l0", "fvu", "dead_fraction", "dense_fraction"):
        np.testing.assert_allclose(evaluation[key], reference_eval[key], rtol=1e-4, err_msg=key)


@pytest.mark.parametrize("layout", ["data-parallel", "sharded"])
def test_two_ranks_take_the_sparse_step_as_one_process(activations, tmp_path, layout):
    """--step sparse (tanh penalty, no pre-activation loss) under both layouts equals one process."""
    sparse = ["--pre-act-loss-coefficient", "0", "--step", "sparse"]
    single = tmp_path / "single"
    assert train.main(flags(activations, single, *sparse)) == 0
    out = tmp_path / layout
    torchrun(2, flags(activations, out, *sparse, *(["--shard-features"] if layout == "sharded" else [])))
    assert_same_sae(out, single)
    assert {r["step_kind"] for r in metrics(out)} == {"sparse"}


@pytest.mark.parametrize("layout", ["data-parallel", "sharded"])
def test_checkpoints_move_between_world_sizes(activations, single, tmp_path, layout):
    extra = ["--shard-features"] if layout == "sharded" else []
    two_then_one, one_then_two = tmp_path / "two_then_one", tmp_path / "one_then_two"
    torchrun(2, flags(activations, two_then_one, "--steps", "6", *extra))
    assert train.main(flags(activations, two_then_one, "--resume")) == 0
    assert_same_sae(two_then_one, single)

    assert train.main(flags(activations, one_then_two, "--steps", "6")) == 0
    torchrun(2, flags(activations, one_then_two, "--resume", *extra))
    assert_same_sae(one_then_two, single)


def test_shard_features_in_a_single_process_says_it_does_nothing(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init("cpu", shard_features=True)[0].world_size == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: --shard-features") and "single process" in line
    distributed.init("cpu", shard_features=False)
    assert capsys.readouterr().err == ""


def test_sharding_needs_divisible_features(activations, tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "jumprelu_ext.train",
        *flags(activations, tmp_path / "o", "--shard-features", "--d-sae", "33"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "error: --shard-features: d_sae 33 is not divisible by the world size 2" in result.stderr


def test_ranks_share_the_harvest_and_train_as_one_process(tmp_path):
    pytest.importorskip("transformers")
    from _tiny_models import CORPUS, save_tiny_gpt2

    model = save_tiny_gpt2(tmp_path / "gpt2")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(CORPUS * 20))
    model_flags = [
        "--model",
        str(model),
        "--layer",
        "1",
        "--dataset",
        str(text),
        "--context-length",
        "32",
        "--eval-fraction",
        "0.2",
        "--device",
        "cpu",
        "--d-sae",
        "64",
        "--batch-size",
        "96",
        "--steps",
        "8",
        "--log-every",
        "4",
        "--threshold-lr",
        "1e-2",
        "--lr",
        "1e-3",
        "--lr-warmup-steps",
        "2",
    ]
    assert train.main([*model_flags, "--out", str(tmp_path / "single")]) == 0
    torchrun(2, [*model_flags, "--out", str(tmp_path / "two")])
    assert_same_sae(tmp_path / "two", tmp_path / "single")
    downstream = [json.loads((tmp_path / d / "eval.json").read_text())["downstream"] for d in ("two", "single")]
    np.testing.assert_allclose(downstream[0]["delta_ce"], downstream[1]["delta_ce"], rtol=1e-4, atol=1e-6)


# Run by torchrun: trains, then reports the threads that are not Python threads (gloo's workers
# would be among them) before joining the process group and after the trainer has returned.
THREAD_PROBE = """
import os, sys, threading
def native_threads():
    return len(os.listdir("/proc/self/task")) - len(threading.enumerate())
before = native_threads()
from jumprelu_ext.train import loop
status = loop.main(sys.argv[1:])
sys.stdout.write(f"rank {os.environ['RANK']}: status {status}, native threads {before} -> {native_threads()}\\n")
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_the_process_group_is_gone_when_the_trainer_returns(activations, tmp_path):
    """A rank must not reach interpreter shutdown with live gloo threads: one that dropped its
    last reference to a finished collective there aborted the rank ("terminate called without an
    active exception") about 1 run in 15, after the run had succeeded (docs/trainer.md#distributed-layouts)."""
    probe = tmp_path / "probe.py"
    probe.write_text(THREAD_PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(probe)]
    result = subprocess.run(
        [*command, *flags(activations, tmp_path / "out", "--steps", "4")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Both ranks write to one pipe, so their reports may share a line: find them anywhere.
    reports = re.findall(r"rank (\d): status (\d+), native threads (\d+) -> (\d+)", result.stdout)
    assert sorted(rank for rank, *_ in reports) == ["0", "1"], result.stdout
    for rank, status, before, after in reports:
        assert status == "0" and before == after, (rank, status, before, after)
