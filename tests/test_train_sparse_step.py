"""The trainer's --step: the sparse and the dense step train the same SAE (to float tolerance),
the log says which ran, and the pre-activation loss is refused with --step sparse."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from jumprelu_ext.train import loop as train
from jumprelu_ext.train.config import ConfigError

pytestmark = pytest.mark.slow  # training runs

D_IN = 16
RUN = (
    "--batch-size 128 --steps 40 --lr 1e-3 --lr-warmup-steps 2 --sparsity-warmup-steps 10 --l0-coefficient 0.05 "
    "--threshold-lr 1e-2 --init-threshold 0.05 --bandwidth 0.05 --log-every 5 --device cpu"
).split()


@pytest.fixture(scope="module")
def activations(tmp_path_factory):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, D_IN)).astype(np.float32) * 2.0 + 0.5
    path = tmp_path_factory.mktemp("data") / "acts.npy"
    np.save(path, x)
    return path


def run(activations, out, *extra):
    d_sae = [] if "--d-sae" in extra else ["--d-sae", "256"]
    assert train.main(["--activations", str(activations), "--out", str(out), *d_sae, *RUN, *extra]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "eval.json").read_text()), rows


@pytest.mark.parametrize("extra", [[], ["--sparsity-loss", "tanh", "--ste-to-input"]], ids=["step", "tanh-ste"])
def test_sparse_and_dense_steps_train_the_same_sae(activations, tmp_path, extra):
    dense, dense_rows = run(activations, tmp_path / "dense", "--step", "dense", *extra)
    sparse, sparse_rows = run(activations, tmp_path / "sparse", "--step", "sparse", *extra)
    assert {r["step_kind"] for r in dense_rows} == {"dense"} and {r["step_kind"] for r in sparse_rows} == {"sparse"}
    assert dense["l0"] > 2  # features fire: the two steps differ in what they compute
    for key in ("l0", "fvu", "dead_fraction"):
        np.testing.assert_allclose(sparse[key], dense[key], rtol=2e-3, atol=1e-4, err_msg=key)
    for key in ("loss", "l0", "fvu"):
        np.testing.assert_allclose([r[key] for r in sparse_rows], [r[key] for r in dense_rows], rtol=2e-3, err_msg=key)


def test_auto_moves_to_the_sparse_step_and_resumes_exactly(activations, tmp_path):
    """A 2,048-wide SAE starts dense, falls below the density threshold as λ bites, then takes
    the sparse step; a run stopped after the switch and resumed ends bitwise where an uninterrupted
    one does (the step policy is in the checkpoint)."""
    wide = ["--d-sae", "2048", "--bandwidth", "0.01", "--checkpoint-every", "33"]
    wide += ["--lr-decay", "none"]  # the same lr in both runs
    whole, rows = run(activations, tmp_path / "whole", *wide)
    kinds = [r["step_kind"] for r in rows]
    assert kinds[0] == "dense" and kinds[-1] == "sparse", kinds
    run(activations, tmp_path / "resumed", *wide, "--steps", "33")
    resumed, _ = run(activations, tmp_path / "resumed", *wide, "--resume")
    a, b = (load_file(tmp_path / name / "sae_weights.safetensors") for name in ("whole", "resumed"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert resumed == whole | {"train_tokens_per_s": resumed["train_tokens_per_s"]}


def test_sparse_step_refuses_the_pre_activation_loss(activations, tmp_path):
    flags = ["--activations", str(activations), "--out", str(tmp_path / "r"), *RUN, "--step", "sparse"]
    with pytest.raises(ConfigError, match="--step sparse cannot compute the pre-activation loss"):
        train.main([*flags, "--pre-act-loss-coefficient", "0.1"])
