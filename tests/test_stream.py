"""Streaming --model training: lazy windows, held-out windows never served, passes, exact resume."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from conftest import DEVICES

from jumprelu_ext.train import loop as train
from jumprelu_ext.train.data import harvest as harvest_module
from jumprelu_ext.train.data import stream as stream_module
from jumprelu_ext.train.data.harvest import (
    harvest,
    iter_windows,
    load_model,
    tokenize,
    window_spec,
    windows_to_batch,
)
from jumprelu_ext.train.data.stream import StreamedBatches, heldout_windows
from jumprelu_ext.train.data.text import iter_texts


@pytest.fixture(scope="module")
def gpt2(tiny):
    return load_model(str(tiny[0]), layer=1)


@pytest.mark.parametrize("max_tokens", [None, 500])
def test_windows_resume_from_any_position(gpt2, tiny, monkeypatch, max_tokens):
    monkeypatch.setattr(harvest_module, "_DOCUMENTS_PER_CALL", 7)  # many chunk boundaries
    text = str(tiny[1])
    spec = window_spec(gpt2.tokenizer, 16, gpt2.is_causal_lm)
    windows = list(iter_windows(gpt2.tokenizer, iter_texts(text), spec, max_tokens))
    whole = tokenize(gpt2.tokenizer, iter_texts(text), 16, gpt2.is_causal_lm, max_tokens=max_tokens)
    assert torch.equal(windows_to_batch([row for row, _ in windows], spec).input_ids, whole.input_ids)
    for i in range(0, len(windows), 5):
        pos = windows[i][1]
        again = list(iter_windows(gpt2.tokenizer, iter_texts(text, pos.doc), spec, max_tokens, pos))
        assert again == windows[i + 1 :]


def stream(gpt2, text, heldout=frozenset(), **kwargs):
    spec = window_spec(gpt2.tokenizer, 16, gpt2.is_causal_lm)
    options = {"batch_size": 48, "buffer_tokens": 200, "seed": 3, "harvest_batch_size": 4, **kwargs}
    return StreamedBatches(gpt2, str(text), spec, heldout=heldout, **options)


def test_each_pass_serves_every_training_row_once_and_no_held_out_row(gpt2, tiny):
    text = str(tiny[1])
    spec = window_spec(gpt2.tokenizer, 16, gpt2.is_causal_lm)
    eval_tokens, heldout = heldout_windows(gpt2, text, spec, None, 0.1, 256, seed=0)
    assert len(eval_tokens) == len(heldout) > 0
    all_windows = tokenize(gpt2.tokenizer, iter_texts(text), 16, gpt2.is_causal_lm)
    train_idx = [i for i in range(len(all_windows)) if i not in heldout]
    expected = harvest(gpt2, all_windows.select(train_idx))
    held_out = harvest(gpt2, eval_tokens)

    messages = []
    batches = stream(gpt2, text, heldout, log=messages.append)
    served = torch.cat([next(batches) for _ in range(2 * expected.shape[0] // 48 + 2)])
    assert batches.rows_per_pass == expected.shape[0]
    first_pass = served[: expected.shape[0]]
    # The same rows (up to the forward-pass grouping's rounding), as many times each: a row may
    # occur several times (the first token after BOS depends on that token alone).
    close = lambda a, b: (torch.cdist(a.double(), b.double()) < 1e-4).sum(dim=0)  # noqa: E731
    assert torch.equal(close(first_pass, expected), close(expected, expected))
    only_held_out = held_out[close(expected, held_out) == 0]
    assert only_held_out.shape[0] > 0 and close(served, only_held_out).sum() == 0
    assert any("pass 2" in m for m in messages) and any("pass 3" in m for m in messages)
    second_pass = served[expected.shape[0] : 2 * expected.shape[0]]
    assert not torch.equal(first_pass, second_pass)  # reshuffled
    batches.close()


@pytest.mark.slow
@pytest.mark.parametrize("max_pieces", [32, 4])  # 4: the first pass's 9 fills are merged into 4 pieces
def test_later_passes_read_the_text_in_a_new_order(gpt2, tiny, monkeypatch, max_pieces):
    monkeypatch.setattr(stream_module, "MAX_PIECES", max_pieces)
    messages = []
    batches = stream(gpt2, tiny[1], log=messages.append)
    fills, finish = [], batches._finish

    def recording(part):
        fill = finish(part)
        fills.append((fill.start[0], fill.rows))
        return fill

    batches._finish = recording
    while len({pass_ for pass_, _ in fills}) < 4:
        next(batches)
    batches.close()
    passes = [torch.cat([rows for pass_, rows in fills if pass_ == k]) for k in range(3)]
    assert sum(pass_ == 0 for pass_, _ in fills) > max_pieces or max_pieces == 32
    close = lambda a, b: (torch.cdist(a.double(), b.double()) < 1e-4).sum(dim=0)  # noqa: E731
    for later in passes[1:]:  # the same rows, each as often (rounding aside) ...
        assert torch.equal(close(later, passes[0]), close(passes[0], passes[0]))
    for a, b in zip(passes, passes[1:]):  # ... read in another order every pass
        assert not torch.allclose(a, b, atol=1e-4)
    assert f"pass 3 over {tiny[1]} begins, its {min(max_pieces, 9)} pieces in a new order" in " ".join(messages)


@pytest.mark.slow
def test_state_dict_resumes_the_stream_exactly(gpt2, tiny):
    reference = stream(gpt2, tiny[1])
    batches = [next(reference) for _ in range(100)]  # about 2.6 passes over the text
    for k in (0, 3, 11, 29, 47, 83):
        resumed = stream(gpt2, tiny[1])
        first = stream(gpt2, tiny[1])
        for _ in range(k):
            next(first)
        state = first.state_dict()
        resumed.load_state_dict(torch.load(_save(state), weights_only=True))
        for j in range(k, 100):
            assert torch.equal(next(resumed), batches[j]), (k, j)
        first.close()
        resumed.close()
    reference.close()


def _save(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.slow
def test_a_text_that_fits_in_one_fill_is_harvested_once(gpt2, tiny):
    messages = []
    batches = stream(gpt2, tiny[1], buffer_tokens=10**6, log=messages.append)
    calls, original = {"n": 0}, batches._harvest_share

    def counting(tokens):
        calls["n"] += 1
        return original(tokens)

    batches._harvest_share = counting
    for _ in range(100):
        next(batches)
    batches.close()
    assert calls["n"] == 1 and batches.fill_index >= 2
    assert f"pass 2 over {tiny[1]} begins, its one fill reshuffled" in messages[0]


def model_flags(tiny, out, *extra):
    model, text = tiny
    return [
        "--model",
        str(model),
        "--layer",
        "1",
        "--dataset",
        str(text),
        "--context-length",
        "16",
        "--buffer-tokens",
        "300",
        "--harvest-batch-size",
        "4",
        "--eval-fraction",
        "0.1",
        "--d-sae",
        "64",
        "--batch-size",
        "64",
        "--steps",
        "40",
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
        "--device",
        "cpu",
        "--checkpoint-every",
        "7",
        "--out",
        str(out),
        *extra,
    ]


KILLER = """
import os, signal, sys
from jumprelu_ext.train import loop
from jumprelu_ext.train.data.stream import StreamedBatches
original, count = StreamedBatches.__next__, [0]
def next_batch(self):
    count[0] += 1
    if count[0] == int(os.environ["KILL_AT_BATCH"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self)
StreamedBatches.__next__ = next_batch
sys.exit(loop.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_streamed_run_killed_between_checkpoints_resumes_to_the_same_weights(tiny, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert train.main(model_flags(tiny, reference)) == 0
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "KILL_AT_BATCH": "33"}
    result = subprocess.run(
        [sys.executable, str(script), *model_flags(tiny, out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 28 and state["data"]["kind"] == "stream" and state["data"]["pass"] >= 1
    assert train.main(model_flags(tiny, out, "--resume")) == 0
    ours, theirs = load_file(out / "sae_weights.safetensors"), load_file(reference / "sae_weights.safetensors")
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    assert json.loads((out / "eval.json").read_text())["steps"] == 40


@pytest.mark.slow
def test_a_parquet_text_trains_exactly_as_the_same_text_file(tiny, tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": list(iter_texts(str(tiny[1])))}), parquet, row_group_size=50)
    assert train.main(model_flags(tiny, tmp_path / "txt")) == 0
    assert train.main(model_flags((tiny[0], parquet), tmp_path / "parquet")) == 0
    ours, theirs = (load_file(tmp_path / run / "sae_weights.safetensors") for run in ("parquet", "txt"))
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def write_parquet_stub(path):
    path.write_bytes(b"PAR1 not really parquet PAR1")
    return path


@pytest.mark.parametrize(
    "case",
    ["missing", "empty", "empty-folder", "jsonl-without-text", "parquet-without-pyarrow", "context", "buffer"],
)
def test_bad_streaming_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, monkeypatch, case):
    from jumprelu_ext.train.errors import run_cli

    dataset, extra = tiny[1], []
    if case == "missing":
        dataset, expected = tmp_path / "nope.txt", "nope.txt: no such file"
    elif case == "empty":
        dataset, expected = tmp_path / "empty.txt", "empty.txt: file is empty"
        dataset.write_text("")
    elif case == "empty-folder":
        dataset, expected = tmp_path / "texts", "folder holds no .txt, .jsonl or .parquet files"
        dataset.mkdir()
    elif case == "jsonl-without-text":
        dataset, expected = tmp_path / "docs.jsonl", "docs.jsonl: line 1 has no string field 'text'"
        dataset.write_text(json.dumps({"body": "the dog"}) + "\n")
    elif case == "parquet-without-pyarrow":
        monkeypatch.setitem(sys.modules, "pyarrow", None)
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
        dataset, expected = write_parquet_stub(tmp_path / "docs.parquet"), "needs pyarrow"
    elif case == "context":
        extra, expected = ["--context-length", "65"], "--context-length 65 exceeds"
    else:
        extra, expected = ["--buffer-tokens", "32"], "--buffer-tokens 32 is smaller than one batch (--batch-size 64)"
    flags = model_flags((tiny[0], dataset), tmp_path / "run", *extra)
    assert run_cli(train.main, flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)  # on CUDA the producer harvests on a stream of its own
def test_the_producer_thread_changes_nothing_but_timing(gpt2, tiny, device):
    model = gpt2 if device == "cpu" else load_model(str(tiny[0]), layer=1, device=device)
    tokens = tokenize(model.tokenizer, iter_texts(str(tiny[1])), 16, model.is_causal_lm)
    reference = harvest(model, tokens)
    with_thread = stream(model, tiny[1], device=device)
    without = stream(model, tiny[1], device=device, prefetch=False)
    for i in range(60):
        batch = next(with_thread)
        assert batch.device.type == device
        assert torch.equal(batch, next(without))
        if i % 10 == 0:  # the main thread uses the model while the producer harvests with it
            assert torch.equal(harvest(model, tokens), reference)
    assert with_thread._producer is not None  # the next fill is on its way
    with_thread.close()
