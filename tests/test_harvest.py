"""Text sources, model loading, tokenization into windows, and harvesting the hooked block's output."""

import json
import re
import sys
import types

import pytest
import torch

# transformers is a dependency here and in CI; the bare GPU machine may lack it.
pytest.importorskip("transformers")

from _tiny_models import CORPUS, read_texts, save_tiny_bert

from jumprelu_ext.train.data.harvest import (
    ALLOW_DOWNLOAD_ENV,
    EMBEDDED_MODEL,
    HarvestError,
    harvest,
    load_model,
    splice,
    tokenize,
)
from jumprelu_ext.train.data.text import EMBEDDED_DATASET, TextError, iter_texts


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_folder):
    return load_model(str(tiny_gpt2_folder), layer=0)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


def windows(loaded, context_length=16, texts=CORPUS, **kwargs):
    return tokenize(loaded.tokenizer, texts, context_length, loaded.is_causal_lm, **kwargs)


# --- text sources ---------------------------------------------------------------------------


def test_pydoc_topics_is_one_document_per_topic_in_key_order():
    from pydoc_data.topics import topics

    texts = read_texts(EMBEDDED_DATASET)
    assert texts == [topics[k] for k in sorted(topics)]
    assert read_texts(EMBEDDED_DATASET, max_documents=3) == texts[:3]


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first doc\nstill first\n\n \nsecond doc\n\n\n\nthird\n")
    assert read_texts(str(path)) == ["first doc\nstill first", "second doc", "third"]


def test_jsonl_reads_the_text_field_and_skips_blank_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_texts(str(path)) == ["one", "two"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{not json\n', "line 2 is not valid JSON"),
        ('{"text": "ok"}\n{"body": "x"}\n', "line 2 has no string field 'text'"),
        ('["text"]\n', "line 1 has no string field 'text'"),
        ("", "file is empty"),
        ('{"text": "  "}\n', "contains no text"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(TextError, match=message) as info:
        read_texts(str(path))
    assert str(path) in str(info.value)


BLOCK = 1 << 20  # the size of the blocks the offset is found in: a character may straddle two


@pytest.mark.parametrize(
    "name, content, offset",
    [
        ("latin1.txt", "first\n\ncafé au lait\n".encode("latin-1"), 10),
        ("one-bad-byte.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 28),
        ("binary.txt", b"MZ\x90\x00\x03\x00\xff\xfe", 2),
        ("late.txt", b"a" * (BLOCK - 1) + "é\n\nthen ".encode() + b"\xe9", BLOCK - 1 + 2 + 7),
    ],
    ids=["latin1", "jsonl", "binary", "after-a-straddling-character"],
)
def test_text_that_is_not_utf8_names_the_file_and_the_byte(tmp_path, name, content, offset):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TextError) as info:
        read_texts(str(path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: not UTF-8 text")
    assert f"byte 0x{content[offset]:02x} at offset {offset}" in message, message
    assert "iconv -f latin1 -t utf-8" in message


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(TextError, match="no such file"):
        read_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(TextError, match="unsupported text file"):
        read_texts(str(tmp_path / "table.csv"))
    with pytest.raises(TextError, match="folder holds no .txt, .jsonl or .parquet files"):
        read_texts(str(tmp_path))


def test_a_folder_is_its_files_in_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.jsonl").write_text(json.dumps({"text": "three"}) + "\n")
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert read_texts(str(tmp_path)) == ["one", "two", "three"]
    assert read_texts(str(tmp_path), max_documents=2) == ["one", "two"]


def test_parquet_reads_the_text_column_across_row_groups(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    texts = [f"document {i}" if i % 7 else (None if i % 2 else " ") for i in range(2500)]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": range(2500), "text": texts}), path, row_group_size=700)
    expected = [t for t in texts if t and t.strip()]  # empty and missing texts are skipped
    assert read_texts(str(path)) == expected
    (tmp_path / "z.jsonl").write_text(json.dumps({"text": "last"}) + "\n")
    assert read_texts(str(tmp_path)) == [*expected, "last"]  # a folder mixes the formats
    for kind in ("large_string", "string_view"):  # every arrow string type reads the same
        other = tmp_path / f"{kind}.parquet"
        pq.write_table(pa.table({"text": pa.array(texts, type=getattr(pa, kind)())}), other)
        assert read_texts(str(other)) == expected


@pytest.mark.parametrize(
    "table, message",
    [
        ({"body": ["x"]}, "has no column 'text' (columns: ['body'])"),
        ({"text": [1, 2]}, "column 'text' holds int64, not strings"),
        ({"text": ["", None]}, "contains no text"),
        (None, "cannot read as .parquet"),
    ],
)
def test_bad_parquet_names_the_file_and_the_problem(tmp_path, table, message):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "bad.parquet"
    if table is None:
        path.write_bytes(b"PAR1 truncated")
    else:
        pq.write_table(pa.table(table), path)
    with pytest.raises(TextError, match=re.escape(message)) as info:
        read_texts(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_hub_name_is_streamed_with_datasets(monkeypatch):
    # A stand-in for the datasets package (the hub cannot be reached from the tests): what we ask
    # of it, and what we make of its records.
    calls = []

    def load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return iter([{"text": "one", "id": 1}, {"text": " "}, {"text": "two"}, {"text": "three"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert read_texts("org/corpus") == ["one", "two", "three"]
    assert calls == [("org/corpus", {"split": "train", "streaming": True})]
    assert list(iter_texts("org/corpus", start=1)) == ["two", "three"]  # where a resumed stream starts

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: [{"body": "x"}]))
    with pytest.raises(
        TextError, match=re.escape("dataset 'org/corpus': records have no 'text' field (fields: ['body'])")
    ):
        read_texts("org/corpus")


def test_hub_dataset_failure_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TextError, match="nobody/no-such-dataset") as info:
        read_texts("nobody/no-such-dataset")
    assert "\n" not in str(info.value)


# --- loading --------------------------------------------------------------------------------


def test_loaded_model_describes_the_hook_point(gpt2):
    assert gpt2.is_causal_lm and gpt2.d_model == 32 and len(gpt2.layers) == 2 and gpt2.max_positions == 64
    assert not gpt2.model.training
    assert all(not p.requires_grad for p in gpt2.model.parameters())
    assert all(p.dtype == torch.float32 for p in gpt2.model.parameters())


def test_layer_out_of_range(bert_folder):
    with pytest.raises(HarvestError) as info:
        load_model(str(bert_folder), layer=2)
    assert str(info.value) == f"--layer 2 is out of range: {bert_folder} has 2 layers (0..1)"
    with pytest.raises(HarvestError, match="out of range"):
        load_model(str(bert_folder), layer=-1)


def test_unknown_model(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_DOWNLOAD_ENV, raising=False)
    with pytest.raises(HarvestError, match="no such folder"):
        load_model(str(tmp_path / "no-such-model"), layer=0)
    with pytest.raises(HarvestError, match="cannot load model 'nobody/no-such-model-xyz'") as info:
        load_model("nobody/no-such-model-xyz", layer=0)
    assert "\n" not in str(info.value) and ALLOW_DOWNLOAD_ENV in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HarvestError, match="cannot load model"):
        load_model(str(tmp_path / "empty"), layer=0)


# --- tokenization ---------------------------------------------------------------------------


def test_causal_windows_start_with_bos_and_separate_documents_with_eos(gpt2):
    tok = gpt2.tokenizer
    tokens = windows(gpt2)
    ids, mask, keep = tokens.input_ids, tokens.attention_mask, tokens.keep
    assert (ids[:, 0] == tok.bos_token_id).all()
    stream = ids[mask.bool()][ids[mask.bool()] != tok.bos_token_id].tolist()
    assert stream.count(tok.eos_token_id) == len(CORPUS) - 1
    assert mask[-1, -1] == 0 and (ids[-1][mask[-1] == 0] == tok.pad_token_id).all()
    special = torch.tensor(tok.all_special_ids)
    assert not torch.isin(ids[keep], special).any()
    assert (torch.isin(ids, special) | (mask == 0) | keep).all()
    assert tokens.num_tokens == sum(len(doc.split()) for doc in CORPUS)


def test_encoder_windows_are_cls_text_sep(bert_folder):
    loaded = load_model(str(bert_folder), layer=0)
    tok = loaded.tokenizer
    tokens = windows(loaded, context_length=8)
    lengths = tokens.attention_mask.sum(dim=1)
    for row, n, keep in zip(tokens.input_ids, lengths, tokens.keep):
        assert row[0] == tok.cls_token_id and row[n - 1] == tok.sep_token_id
        assert keep[1 : n - 1].all() and not keep[0] and not keep[n - 1 :].any()
    with pytest.raises(HarvestError, match="no room for text"):
        windows(loaded, context_length=2)


def test_tokenize_errors_and_max_tokens(gpt2):
    with pytest.raises(HarvestError, match="no tokens"):
        windows(gpt2, texts=["", "   ", "<eos>"])
    with pytest.raises(HarvestError, match="positive"):
        windows(gpt2, context_length=0)
    tokens = windows(gpt2, max_tokens=20)
    assert tokens.num_tokens == 20
    assert torch.equal(tokens.input_ids[0], windows(gpt2).input_ids[0])


def test_context_longer_than_the_model_allows(gpt2):
    with pytest.raises(HarvestError, match="exceeds .* maximum of 64 positions"):
        harvest(gpt2, windows(gpt2, context_length=65))


# --- harvesting -----------------------------------------------------------------------------


@pytest.mark.parametrize("model, layer", [("gpt2", 0), ("bert", 0), ("bert", 1)])
def test_harvest_equals_hidden_states_at_kept_positions(request, bert_folder, model, layer):
    # GPT-2's last hidden_states entry has ln_f applied, so only its non-final block is compared.
    loaded = request.getfixturevalue("gpt2") if model == "gpt2" else load_model(str(bert_folder), layer)
    tokens = windows(loaded)
    got = harvest(loaded, tokens, batch_size=len(tokens))
    out = loaded.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
    expected = out.hidden_states[layer + 1][tokens.keep]
    assert got.dtype == torch.float32 and got.shape == (tokens.num_tokens, loaded.d_model)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_harvest_stops_after_the_hooked_block(gpt2):
    calls = []
    handle = gpt2.layers[1].register_forward_hook(lambda *args: calls.append(1))
    try:
        harvest(gpt2, windows(gpt2))
    finally:
        handle.remove()
    assert calls == []


def test_harvest_max_tokens_batches_and_determinism(gpt2):
    tokens = windows(gpt2)
    full = harvest(gpt2, tokens, batch_size=2)
    assert torch.equal(full, harvest(gpt2, tokens, batch_size=2))
    assert torch.equal(harvest(gpt2, tokens, batch_size=2, max_tokens=11), full[:11])
    assert harvest(gpt2, tokens, max_tokens=10**6).shape[0] == tokens.num_tokens
    torch.testing.assert_close(harvest(gpt2, tokens, batch_size=1), full, rtol=1e-6, atol=1e-6)


def test_splice_replaces_the_block_output_only_while_active(gpt2):
    tokens = windows(gpt2)
    clean = gpt2.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits
    with splice(gpt2, torch.zeros_like):
        spliced = gpt2.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits
    after = gpt2.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits
    assert not torch.equal(clean, spliced)
    assert torch.equal(clean, after)


# --- the bundled MiniLM ---------------------------------------------------------------------


def test_embedded_minilm():
    loaded = load_model(EMBEDDED_MODEL, layer=3)
    assert (len(loaded.layers), loaded.d_model, loaded.is_causal_lm) == (6, 384, False)
    tokens = windows(loaded, context_length=128, texts=read_texts(EMBEDDED_DATASET, max_documents=2), max_tokens=300)
    tok = loaded.tokenizer
    assert (tokens.input_ids[:, 0] == tok.cls_token_id).all()
    assert not torch.isin(tokens.input_ids[tokens.keep], torch.tensor(tok.all_special_ids)).any()
    acts = harvest(loaded, tokens)
    assert acts.shape == (300, 384) and torch.isfinite(acts).all()
    with pytest.raises(HarvestError, match="has 6 layers"):
        load_model(EMBEDDED_MODEL, layer=6)
