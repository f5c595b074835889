"""Text sources for harvesting activations: an embedded corpus, local files, Hugging Face datasets.

``dataset`` is one of:

- ``"pydoc-topics"``: the Python standard library's ``pydoc_data.topics.topics`` (real English,
  about 128k MiniLM tokens), one document per topic in sorted key order. Needs no download.
- a local ``.txt`` file: documents are separated by one or more blank lines (paragraphs).
- a local ``.jsonl`` file: one JSON object per line with a string field ``text``.
- anything else: a Hugging Face ``datasets`` name, read with split "train", field "text",
  streaming (``datasets`` is imported only then, and may need the network or its cache).

``iter_texts`` yields documents lazily (a large streamed dataset is read only as far as the
caller consumes it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError, first_line

__all__ = ["EMBEDDED_DATASET", "TextError", "iter_texts"]

EMBEDDED_DATASET = "pydoc-topics"
_FILE_SUFFIXES = (".txt", ".jsonl")
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")


class TextError(UserError):
    """A text source that cannot be used, with the file (or dataset) and the problem in the message."""


def _pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def _txt_documents(path: Path) -> Iterator[str]:
    for doc in _BLANK_LINES.split(path.read_text(encoding="utf-8")):
        if doc.strip():
            yield doc.strip()


def _jsonl_documents(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
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


def _file_documents(path: Path) -> Iterator[str]:
    # Checked here, not in the generator, so that a bad path fails before any work starts.
    if not path.is_file():
        raise TextError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise TextError(f"{path}: file is empty")
    return _nonempty(path, _txt_documents if path.suffix == ".txt" else _jsonl_documents)


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


def iter_texts(dataset: str) -> Iterator[str]:
    """The non-empty documents of ``dataset`` (see the module docstring), lazily."""
    if dataset == EMBEDDED_DATASET:
        return _pydoc_topics()
    path = Path(dataset)
    if path.suffix in _FILE_SUFFIXES or path.exists():
        if path.suffix not in _FILE_SUFFIXES:
            raise TextError(f"{path}: unsupported text file (expected .txt or .jsonl)")
        return _file_documents(path)
    return _hub_documents(dataset)
