"""Text sources for harvesting activations: an embedded corpus, local files, Hugging Face datasets.

``dataset`` is one of:

- ``"pydoc-topics"``: the Python standard library's ``pydoc_data.topics.topics`` (real English,
  about 128k MiniLM tokens), one document per topic in sorted key order. Needs no download.
- a local ``.txt`` file: documents are separated by one or more blank lines (paragraphs).
- a local ``.jsonl`` file: one JSON object per line with a string field ``text``.
- ``.txt`` and ``.jsonl`` files must be UTF-8: a byte that is not is a ``TextError`` naming the
  file and the byte's offset (no guessing at another encoding, no silent replacement).
- a local ``.parquet`` file with a string column ``text`` (needs pyarrow), read in record batches.
- a local folder: every ``.txt`` / ``.jsonl`` / ``.parquet`` file under it, in path order.
- anything else: a Hugging Face ``datasets`` name, read with split "train", field "text",
  streaming (``datasets`` is imported only then, and may need the network or its cache).

``iter_texts`` yields documents lazily (a large streamed dataset is read only as far as the
caller consumes it); ``start`` skips documents without tokenising them (resuming a stream).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from ..errors import UserError, first_line

__all__ = ["EMBEDDED_DATASET", "TextError", "iter_texts"]

EMBEDDED_DATASET = "pydoc-topics"
_FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
_HORIZONTAL_SPACE = " \t\r\f\v"


class TextError(UserError):
    """A text source that cannot be used, with the file (or dataset) and the problem in the message."""


def _pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def _utf8_lines(path: Path) -> Iterator[str]:
    """The file's lines, read lazily as UTF-8; a byte that is not UTF-8 is a ``TextError``."""
    with path.open(encoding="utf-8") as f:
        try:
            yield from f
        except UnicodeDecodeError as e:
            raise TextError(_not_utf8(path, e)) from e


def _not_utf8(path: Path, error: UnicodeDecodeError) -> str:
    """The one-line error for a file that is not UTF-8, naming the first bad byte's offset in the
    file (the text reader decodes in blocks, so ``error`` only knows its place in one block)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        try:
            while block := f.read(1 << 20):
                offset += len(block)
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:  # e.object: the bytes the decoder held back, then the block
            where = f"byte 0x{e.object[e.start]:02x} at offset {offset - len(e.object) + e.start}"
        else:  # the file changed since it was read
            where = error.reason
    return (
        f"{path}: not UTF-8 text ({where}): convert it to UTF-8 first, "
        f"e.g. for Latin-1: iconv -f latin1 -t utf-8 {path} > {path.with_name(path.stem + '.utf8' + path.suffix)}"
    )


def _txt_documents(path: Path) -> Iterator[str]:
    # Line by line, so a large file is never held whole: a blank line (spaces and tabs allowed)
    # ends a document.
    lines: list[str] = []
    for line in _utf8_lines(path):
        if line.strip(_HORIZONTAL_SPACE + "\n"):
            lines.append(line)
        elif lines:
            yield "".join(lines).strip()
            lines = []
    if lines:
        yield "".join(lines).strip()


def _jsonl_documents(path: Path) -> Iterator[str]:
    for number, line in enumerate(_utf8_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TextError(f"{path}: line {number} is not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise TextError(f"{path}: line {number} has no string field 'text'")
        if record["text"].strip():
            yield record["text"]


def _parquet_documents(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        source = pq.ParquetFile(path)
    except Exception as e:  # not a parquet file, truncated footer, ...
        raise TextError(f"{path}: cannot read as .parquet ({first_line(e)})") from e
    if "text" not in source.schema_arrow.names:
        raise TextError(f"{path}: has no column 'text' (columns: {source.schema_arrow.names})")
    column_type = source.schema_arrow.field("text").type
    if str(column_type) not in ("string", "large_string", "string_view"):  # ints would read as "no text"
        raise TextError(f"{path}: column 'text' holds {column_type}, not strings")
    for batch in source.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def _check_file(path: Path) -> None:
    # Checked before any generator runs, so that a bad path fails before any work starts.
    if not path.is_file():
        raise TextError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise TextError(f"{path}: file is empty")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError as e:
            raise TextError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from e


_READERS = {".txt": _txt_documents, ".jsonl": _jsonl_documents, ".parquet": _parquet_documents}


def _file_documents(path: Path) -> Iterator[str]:
    _check_file(path)
    return _nonempty(path, _READERS[path.suffix])


def _folder_documents(path: Path) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _FILE_SUFFIXES)
    if not files:
        raise TextError(f"{path}: folder holds no .txt, .jsonl or .parquet files")
    for file in files:
        _check_file(file)

    def documents():
        for file in files:
            yield from _READERS[file.suffix](file)

    return _nonempty(path, lambda _: documents())


def _nonempty(path: Path, read) -> Iterator[str]:
    found = False
    for doc in read(path):
        found = True
        yield doc
    if not found:
        raise TextError(f"{path}: contains no text")


def _hub_documents(name: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:
        raise TextError(
            f"dataset {name!r} is neither {EMBEDDED_DATASET!r} nor a .txt/.jsonl file, and the "
            "'datasets' package needed to load it from Hugging Face is not installed"
        ) from e
    try:
        # Errors can surface while streaming (network, missing field), not only at load time.
        for record in datasets.load_dataset(name, split="train", streaming=True):
            if "text" not in record:
                raise TextError(f"dataset {name!r}: records have no 'text' field (fields: {sorted(record)})")
            if record["text"] and record["text"].strip():
                yield record["text"]
    except TextError:
        raise
    except Exception as e:  # datasets raises many kinds: FileNotFoundError, ConnectionError, ValueError, ...
        raise TextError(f"cannot load dataset {name!r}: {first_line(e)}") from e


def iter_texts(dataset: str, start: int = 0) -> Iterator[str]:
    """The non-empty documents of ``dataset`` (see the module docstring), lazily, from document
    ``start`` on."""
    if dataset == EMBEDDED_DATASET:
        documents = _pydoc_topics()
    else:
        path = Path(dataset)
        if path.is_dir():
            documents = _folder_documents(path)
        elif path.suffix in _FILE_SUFFIXES or path.exists():
            if path.suffix not in _FILE_SUFFIXES:
                raise TextError(f"{path}: unsupported text file (expected .txt, .jsonl or .parquet)")
            documents = _file_documents(path)
        else:
            documents = _hub_documents(dataset)
    return islice(documents, start, None) if start else documents
