"""Training activations streamed from a model over text, in bounded memory, exactly resumable.

``StreamedBatches`` has the interface of ``ShuffledBatches`` (``next()``, ``state_dict`` /
``load_state_dict``, ``batch_size``, ``dropped_rows``, ``device``), so the training loop does not
know which one it reads. The text is read lazily and cut into windows (``harvest.iter_windows``);
the held-out windows are set aside first (``heldout_windows``) and skipped in every pass. The
rest is harvested, ``--harvest-batch-size`` windows per forward pass, into *fills* of at least
``--buffer-tokens`` rows (or up to the end of the text). A fill is served in a seeded random order
(PCG64 of (seed, fill number)) and global batch k is the stream positions [k·B, (k+1)·B),
crossing fill ends, exactly as ``ShuffledBatches`` crosses epoch ends. When the text runs out, the
next fill starts another pass over it. A text whose training windows fit in one fill is harvested
once: every pass is the same fill, reshuffled (the in-memory case is the same code).

Mixing (docs/trainer.md#streaming-from-a-model): every row of a pass is served exactly once in
that pass; a batch is a uniform sample without replacement from one fill (two at a fill's end),
that is from about ``buffer_tokens / context_length`` consecutive windows of text.

Resume: a fill is a pure function of where it starts in the text (pass, ``TextPosition``), and its
order of (seed, fill number). ``state_dict`` records those and the position in the fill; loading
it re-reads the text from the recorded document (no tokenising of what comes before) and
re-harvests that one fill with the same forward-pass grouping, so the rows are bitwise the same on
the same machine. A checkpoint therefore stays small (no activations in it) and resuming costs one
fill's harvest.

Data parallel: every rank reads the same windows, harvests a contiguous share of the fill's forward
passes and receives the others' rows, so every rank holds the single-process fill; then each reads
its share of every global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from ..distributed import all_gather_rows
from .activations import ActivationError, TensorStore, split_holdout
from .harvest import TextPosition, TokenBatch, harvest, iter_windows, windows_to_batch
from .text import iter_texts

__all__ = ["StreamedBatches", "heldout_windows"]


def heldout_windows(loaded, dataset, spec, max_tokens, fraction: float, most: int, seed: int):
    """(TokenBatch of the held-out windows or None, their window numbers): a seeded ``fraction`` of
    the first ``most / fraction`` windows of the text (of all of them when the text is shorter)."""
    if fraction == 0:
        return None, frozenset()
    pool = [
        row
        for row, _ in islice(
            iter_windows(loaded.tokenizer, iter_texts(dataset), spec, max_tokens), math.ceil(most / fraction)
        )
    ]
    if not pool:
        raise ActivationError(f"{dataset}: the text yields no tokens")
    try:
        _, chosen = split_holdout(len(pool), fraction, seed)
    except ActivationError as e:
        raise ActivationError(f"{dataset}: {e} (windows of the text)") from e
    return windows_to_batch([pool[i] for i in chosen], spec), frozenset(int(i) for i in chosen)


@dataclass
class _Fill:
    index: int  # fills since the start of the run
    start: tuple[int, TextPosition]  # (pass, position) of its first window
    end: tuple[int, TextPosition]  # where the next fill starts
    rows: torch.Tensor  # [n, d] raw activations on the training device
    order: torch.Tensor  # the serving order, a permutation of range(n)
    whole_pass: bool  # it holds every training window of the text


class StreamedBatches:
    """Endless fp32 batches of a model's activations over a text; see the module docstring."""

    def __init__(
        self,
        loaded,
        dataset: str,
        spec,
        *,
        batch_size: int,
        buffer_tokens: int,
        seed: int = 0,
        device="cpu",
        layout=None,
        heldout=frozenset(),
        max_tokens=None,
        harvest_batch_size: int = 32,
        log=None,
    ):
        if buffer_tokens < batch_size:
            raise ActivationError(
                f"--buffer-tokens {buffer_tokens} is smaller than one batch (--batch-size {batch_size})"
            )
        self.loaded, self.dataset, self.spec = loaded, dataset, spec
        self.batch_size, self.buffer_tokens = int(batch_size), int(buffer_tokens)
        self.seed, self.device = int(seed), torch.device(device)
        self.layout = layout
        self.rank, self.world_size = layout.data_shard if layout is not None else (0, 1)
        self.heldout, self.max_tokens = heldout, max_tokens
        self.harvest_batch_size = int(harvest_batch_size)
        self.log = log or (lambda message: None)
        self.dropped_rows = 0
        self.rows_per_pass = None  # training rows in one pass, once a pass has been read
        self.fill_index, self.position = 0, 0
        self._start: tuple[int, TextPosition] = (0, TextPosition())
        self._fill: _Fill | None = None
        self._expect_rows = None  # a resumed fill's row count, checked when it is harvested again
        self._windows = None  # (pass, position it is at, generator): continues from fill to fill
        self._pass_rows = None  # the rows of a pass that fits in one fill
        self._counting = None  # [pass, rows so far] while a pass is read from its start

    # ------------------------------------------------------------------ reading the text

    def _next_window(self, pass_: int, pos: TextPosition):
        """The training window after ``pos`` in pass ``pass_``: (row, position after it), or None at
        the end of the text. Held-out windows are skipped."""
        if self._windows is None or self._windows[:2] != (pass_, pos):
            texts = iter_texts(self.dataset, pos.doc)
            gen = iter_windows(self.loaded.tokenizer, texts, self.spec, self.max_tokens, pos)
            self._windows = (pass_, pos, gen)
        gen = self._windows[2]
        for row, after in gen:
            self._windows = (pass_, after, gen)
            if after.window - 1 not in self.heldout:
                return row, after
        return None

    def _read(self, start):
        """The windows of the fill that starts at ``start``: (rows, where they really start (a fill
        that ended with the text is followed by the next pass), where the next fill starts, whether
        they are a whole pass)."""
        pass_, pos = start
        rows, count = [], 0
        while count < self.buffer_tokens:
            nxt = self._next_window(pass_, pos)
            if nxt is None:  # the text has run out: the fill ends with the pass
                if rows:
                    return rows, start, (pass_ + 1, TextPosition()), start[1] == TextPosition()
                if pos == TextPosition():
                    raise ActivationError(f"{self.dataset}: no training windows left after the held-out ones")
                pass_, pos = pass_ + 1, TextPosition()  # the previous fill ended exactly with the text
                start = (pass_, pos)
                continue
            row, pos = nxt
            rows.append(row)
            count += sum(1 for t in row if t not in self.spec.special)
        return rows, start, (pass_, pos), False

    def _harvest(self, tokens: TokenBatch) -> torch.Tensor:
        """The fill's rows, each rank harvesting a contiguous share of its forward passes."""
        passes = math.ceil(len(tokens) / self.harvest_batch_size)
        bounds = np.linspace(0, passes, self.world_size + 1).astype(int) * self.harvest_batch_size
        share = tokens.select(slice(int(bounds[self.rank]), int(bounds[self.rank + 1])))
        if len(share):
            rows = harvest(self.loaded, share, batch_size=self.harvest_batch_size, device=self.device)
        else:
            rows = torch.empty(0, self.loaded.d_model, device=self.device)
        if self.layout is not None:
            rows = all_gather_rows(rows, self.layout)
        return rows

    def _make_fill(self) -> _Fill:
        start = self._start
        if start[1] == TextPosition() and self._pass_rows is not None:
            rows, end, whole = self._pass_rows, (start[0] + 1, TextPosition()), True
        else:
            windows, start, end, whole = self._read(start)
            rows = self._harvest(windows_to_batch(windows, self.spec))
            if whole:
                self._pass_rows = rows  # every later pass is this same fill: harvested once
        # Count a pass's rows when it has been read from its start (not after a mid-pass resume).
        if start[1] == TextPosition():
            self._counting = [start[0], 0]
        if self._counting is not None and self._counting[0] == start[0]:
            self._counting[1] += rows.shape[0]
            if end[0] > start[0]:
                self.rows_per_pass = self._counting[1]
        if start[0] > 0 and start[1] == TextPosition():
            self.log(
                f"stream: the text ran out; pass {start[0] + 1} over {self.dataset} begins (fill {self.fill_index})"
            )
        if self._expect_rows is not None and rows.shape[0] != self._expect_rows:
            raise ActivationError(
                f"--resume: fill {self.fill_index} of {self.dataset} now has {rows.shape[0]} rows, the checkpoint's "
                f"had {self._expect_rows}: the text or the model changed"
            )
        self._expect_rows = None
        generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.fill_index])))
        order = torch.from_numpy(generator.permutation(rows.shape[0])).to(rows.device)
        return _Fill(self.fill_index, start, end, rows, order, whole)

    def current_fill(self) -> _Fill:
        if self._fill is None:
            self._fill = self._make_fill()
        return self._fill

    def scale_store(self) -> TensorStore:
        """The first fill's rows, for the input-scale estimate."""
        return TensorStore(self.current_fill().rows)

    # ------------------------------------------------------------------ serving

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need:
            fill = self.current_fill()
            take = fill.order[self.position : self.position + need]
            parts.append(fill.rows[take])
            need -= take.numel()
            self.position += take.numel()
            if self.position >= fill.rows.shape[0]:
                self._start, self.fill_index, self.position, self._fill = fill.end, fill.index + 1, 0, None
        x = torch.cat(parts)
        share = -(-x.shape[0] // self.world_size)  # ceil: the last rank may get fewer rows
        x = x[self.rank * share : (self.rank + 1) * share]
        finite = torch.isfinite(x).all(dim=1)
        kept = int(finite.sum())
        self.dropped_rows += x.shape[0] - kept
        return (x if kept == x.shape[0] else x[finite]).to(self.device)

    # ------------------------------------------------------------------ resume

    def _identity(self) -> dict:
        return {
            "seed": self.seed,
            "buffer_tokens": self.buffer_tokens,
            "harvest_batch_size": self.harvest_batch_size,
            "heldout_windows": len(self.heldout),
        }

    def state_dict(self) -> dict:
        pass_, pos = self._start
        return {
            "kind": "stream",
            **self._identity(),
            "fill": self.fill_index,
            "pass": pass_,
            "start": pos.to_dict(),
            "position": self.position,
            "fill_rows": None if self._fill is None else int(self._fill.rows.shape[0]),
            "dropped_rows": self.dropped_rows,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "stream":
            raise ActivationError("--resume: the checkpoint's data position is not that of a stream from a model")
        for key, value in self._identity().items():
            if state.get(key) != value:
                flag = "--" + key.replace("_", "-") if key != "heldout_windows" else "the held-out windows"
                raise ActivationError(
                    f"--resume: the checkpoint's stream has {flag} {state.get(key)}, this run {value}"
                )
        self.fill_index = int(state["fill"])
        self._start = (int(state["pass"]), TextPosition(**state["start"]))
        self.position = int(state["position"])
        self.dropped_rows = int(state["dropped_rows"])
        self._expect_rows = state["fill_rows"]
        self._fill = None
