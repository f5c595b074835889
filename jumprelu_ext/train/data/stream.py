"""Training activations streamed from a model over text, in bounded memory, exactly resumable.

``StreamedBatches`` is a ``BatchSource`` (``source.py``: ``next()``, ``state_dict`` /
``load_state_dict``, ``rows_per_pass``, ...) like ``ShuffledBatches``, so the training loop does not
know which one it reads. The text is read lazily and cut into windows (``harvest.iter_windows``);
the held-out windows are set aside first (``heldout_windows``) and skipped in every pass. The
rest is harvested, ``--harvest-batch-size`` windows per forward pass, into *fills* of at least
``--buffer-tokens`` rows (or up to the end of the text). A fill is served in a seeded random order
(PCG64 of (seed, fill number)) and global batch k is the stream positions [k·B, (k+1)·B),
crossing fill ends, exactly as ``ShuffledBatches`` crosses epoch ends. When the text runs out, the
next fill starts another pass over it, in a new order: the first pass's fills, merged into at most
``MAX_PIECES`` consecutive *pieces*, are read in a seeded permutation of (seed, pass), so later
passes group the windows into fills differently and visit the text's regions in a new order. A
text whose training windows fit in one fill is harvested once: every pass is the same fill,
reshuffled (the in-memory case is the same code).

Mixing (docs/trainer.md#streaming-from-a-model): every row of a pass is served exactly once in
that pass; a batch is a uniform sample without replacement from one fill (two at a fill's end),
that is from about ``buffer_tokens / context_length`` consecutive windows of text.

Resume: a fill is a pure function of where it starts in the text (pass, piece, ``TextPosition``)
and its order of (seed, fill number). ``state_dict`` records those, the position in the fill and
where the first pass's fills started (the pieces of later passes); loading
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
from functools import lru_cache, partial
from itertools import islice

import numpy as np
import torch

from ..distributed import all_gather_rows
from .activations import ActivationError, TensorStore, split_holdout
from .harvest import TextPosition, TokenBatch, harvest, iter_windows, windows_to_batch
from .read_ahead import ReadAhead, run
from .text import iter_texts

__all__ = ["MAX_PIECES", "StreamedBatches", "check_buffer_tokens", "heldout_windows"]

# A later pass reopens the text at each piece's start, and reaching document d of a file means
# reading (not tokenising) the d documents before it: at most this many re-reads per pass.
MAX_PIECES = 32
_PASS_ORDER = 0x9A55  # tells the pass-order seeds apart from the fill-order seeds
PRODUCER_THREAD = "jumprelu-ext-stream-producer"


def check_buffer_tokens(buffer_tokens: int, batch_size: int) -> None:
    """A fill must hold at least one batch."""
    if buffer_tokens < batch_size:
        raise ActivationError(f"--buffer-tokens {buffer_tokens} is smaller than one batch (--batch-size {batch_size})")


def heldout_windows(loaded, dataset, spec, max_tokens, fraction: float, most: int, seed: int):
    """(TokenBatch of the held-out windows or None, their window numbers): a seeded ``fraction`` of
    the first ``most / fraction`` windows of the text (of all of them when the text is shorter)."""
    if fraction == 0:
        return None, frozenset()
    cap = math.ceil(most / fraction)

    def pool():
        return islice(iter_windows(loaded.tokenizer, iter_texts(dataset), spec, max_tokens), cap)

    # Counted first, then read again keeping only the chosen windows: memory holds those alone.
    size = sum(1 for _ in pool())
    if size == 0:
        raise ActivationError(f"{dataset}: the text yields no tokens")
    try:
        _, chosen = split_holdout(size, fraction, seed)
    except ActivationError as e:
        raise ActivationError(f"{dataset}: {e} (windows of the text)") from e
    keep = frozenset(int(i) for i in chosen)
    rows = [row for i, (row, _) in enumerate(pool()) if i in keep]
    return windows_to_batch(rows, spec), keep


@lru_cache(maxsize=2)  # asked once per window read: the pass being read (and the next)
def _piece_order(seed: int, pass_: int, pieces: int) -> np.ndarray:
    """The order a later pass reads its pieces in: a PCG64 permutation seeded with (seed, pass)."""
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, pass_, _PASS_ORDER])))
    return generator.permutation(pieces)


@dataclass
class _Fill:
    index: int  # fills since the start of the run
    start: tuple  # (pass, piece, position or None for the piece's start) of its first window
    end: tuple  # where the next fill starts
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
        prefetch: bool = True,
        total_rows: int | None = None,
    ):
        check_buffer_tokens(buffer_tokens, batch_size)
        self.loaded, self.dataset, self.spec = loaded, dataset, spec
        self.batch_size, self.buffer_tokens = int(batch_size), int(buffer_tokens)
        self.seed, self.device = int(seed), torch.device(device)
        self.layout = layout
        self.rank, self.world_size = layout.data_shard if layout is not None else (0, 1)
        self.heldout, self.max_tokens = heldout, max_tokens
        self.harvest_batch_size = int(harvest_batch_size)
        self.log = log or (lambda message: None)
        self.dropped_rows = 0
        self.rows_per_pass: int | None = None  # training rows in one pass, once a pass has been read
        self.fill_index, self.position = 0, 0
        self._start = (0, 0, None)  # (pass, piece, TextPosition or None for the piece's start)
        self._first_pass_fills: list[TextPosition] = []  # where they start: the pieces of later passes
        self._fill: _Fill | None = None
        self._expect_rows = None  # a resumed fill's row count, checked when it is harvested again
        self._windows = None  # (pass, position it is at, generator): continues from fill to fill
        self._pass_rows = None  # the rows of a pass that fits in one fill
        self._counting = None  # [pass, rows so far] while a pass is read from its start
        # The next fill is harvested on a producer thread while this one is served, unless the
        # run needs no more rows than this one has (total_rows: steps x batch size).
        self.prefetch, self.total_rows = prefetch, total_rows
        self._producer: ReadAhead | None = None  # the next fill's _produce, keyed by where it starts
        self.batches = 0  # global batches served since the start of the run
        self._served = 0  # stream positions served (rows, before the non-finite ones are dropped)

    # ------------------------------------------------------------------ reading the text

    def _next_window(self, pass_: int, pos: TextPosition, end: int | None = None):
        """The training window after ``pos`` in pass ``pass_`` and before window number ``end``:
        (row, position after it), or None at ``end`` or the end of the text. Held-out windows are
        skipped."""
        if self._windows is None or self._windows[:2] != (pass_, pos):
            texts = iter_texts(self.dataset, pos.doc)
            gen = iter_windows(self.loaded.tokenizer, texts, self.spec, self.max_tokens, pos)
            self._windows = (pass_, pos, gen)
        gen = self._windows[2]
        for row, after in gen:
            if end is not None and after.window > end:  # read past the piece: reopen for the next one
                self._windows = None
                return None
            self._windows = (pass_, after, gen)
            if after.window - 1 not in self.heldout:
                return row, after
        return None

    def _pieces(self) -> list[TextPosition]:
        """Where a later pass's pieces start, in text order: the first pass's fills, merged into at
        most ``MAX_PIECES`` runs of consecutive fills."""
        starts, n = self._first_pass_fills, len(self._first_pass_fills)
        return starts if n <= MAX_PIECES else [starts[j * n // MAX_PIECES] for j in range(MAX_PIECES)]

    def _next_row(self, pass_: int, piece: int, pos: TextPosition | None):
        """The training window after (piece, ``pos``) in pass ``pass_``: (row, its piece, the
        position after it), or None when the pass is over. The first pass reads the text in order;
        a later one reads the pieces in its own order, each from its start to the next's."""
        if pass_ == 0:
            nxt = self._next_window(0, pos or TextPosition())
            return None if nxt is None else (nxt[0], 0, nxt[1])
        starts = self._pieces()
        order = _piece_order(self.seed, pass_, len(starts))
        while piece < len(order):
            first = int(order[piece])
            end = starts[first + 1].window if first + 1 < len(starts) else None
            nxt = self._next_window(pass_, pos or starts[first], end)
            if nxt is not None:
                return nxt[0], piece, nxt[1]
            piece, pos = piece + 1, None
        return None

    @staticmethod
    def _is_pass_start(start) -> bool:
        return start[1:] == (0, None)

    def _read(self, start):
        """The windows of the fill that starts at ``start``: (rows, where they really start (a fill
        that ended with a pass is followed by the next pass), where the next fill starts, whether
        they are a whole pass)."""
        pass_, piece, pos = start
        rows, count = [], 0
        while count < self.buffer_tokens:
            nxt = self._next_row(pass_, piece, pos)
            if nxt is None:  # the pass is over: the fill ends with it
                if rows:
                    return rows, start, (pass_ + 1, 0, None), self._is_pass_start(start)
                if self._is_pass_start(start):
                    raise ActivationError(f"{self.dataset}: no training windows left after the held-out ones")
                start = pass_, piece, pos = (pass_ + 1, 0, None)  # the previous fill ended exactly with the pass
                continue
            row, piece, pos = nxt
            rows.append(row)
            count += sum(1 for t in row if t not in self.spec.special)
        return rows, start, (pass_, piece, pos), False

    def _harvest_share(self, tokens: TokenBatch) -> torch.Tensor:
        """This rank's contiguous share of the fill's forward passes (all of them alone)."""
        passes = math.ceil(len(tokens) / self.harvest_batch_size)
        bounds = np.linspace(0, passes, self.world_size + 1).astype(int) * self.harvest_batch_size
        share = tokens.select(slice(int(bounds[self.rank]), int(bounds[self.rank + 1])))
        if not len(share):
            return torch.empty(0, self.loaded.d_model, device=self.device)
        return harvest(self.loaded, share, batch_size=self.harvest_batch_size, device=self.device)

    def _produce(self, start) -> dict:
        """Read and harvest (this rank's share of) the fill at ``start``: the part of making a fill
        that may run on the producer thread (no collectives, no shared state but the text reader).
        On CUDA it runs on a stream of its own (``read_ahead``): the model's forward overlaps the
        SAE's step."""
        if self._is_pass_start(start) and self._pass_rows is not None:
            return {"start": start, "end": (start[0] + 1, 0, None), "whole": True, "rows": self._pass_rows}
        windows, start, end, whole = self._read(start)
        tokens = windows_to_batch(windows, self.spec)
        return {"start": start, "end": end, "whole": whole, "local": self._harvest_share(tokens)}

    def _finish(self, part: dict) -> _Fill:
        """The main thread's part, after the harvest: gather the ranks' shares, bookkeeping."""
        start, end, whole = part["start"], part["end"], part["whole"]
        if "rows" in part:
            rows = part["rows"]
        else:
            rows = part["local"]
            if self.layout is not None:
                rows = all_gather_rows(rows, self.layout)
            if whole:
                self._pass_rows = rows  # every later pass is this same fill: harvested once
        if start[0] == 0:  # the first pass's fills are the later passes' pieces
            first = start[2] or TextPosition()
            if not self._first_pass_fills or first.window > self._first_pass_fills[-1].window:
                self._first_pass_fills.append(first)  # (a resumed fill is recorded already)
        # Count a pass's rows when it has been read from its start (not after a mid-pass resume).
        if self._is_pass_start(start):
            self._counting = [start[0], 0]
        if self._counting is not None and self._counting[0] == start[0]:
            self._counting[1] += rows.shape[0]
            if end[0] > start[0]:
                self.rows_per_pass = self._counting[1]
        if start[0] > 0 and self._is_pass_start(start):
            pieces = len(self._pieces())
            order = "its one fill reshuffled" if pieces == 1 else f"its {pieces} pieces in a new order"
            self.log(
                f"stream: the text ran out; pass {start[0] + 1} over {self.dataset} begins, {order} "
                f"(fill {self.fill_index})"
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
            part = self._join_producer(self._start)
            if part is None:  # nothing made ahead for it: made here, the same way
                part = run(partial(self._produce, self._start), cuda_device=self.device)
            self._fill = self._finish(part)
            offset = self._served - self.position  # stream position of the fill's first row
            needed = self.total_rows is None or offset + self._fill.rows.shape[0] < self.total_rows
            if self.prefetch and needed:
                self._start_producer(self._fill.end)
        return self._fill

    def _start_producer(self, start) -> None:
        self._producer = ReadAhead(
            partial(self._produce, start), name=PRODUCER_THREAD, key=start, cuda_device=self.device
        )

    def _join_producer(self, start=None):
        """Wait for the producer; its fill if it was making the one at ``start`` (raising what making
        it raised), else None (dropping it)."""
        if self._producer is None:
            return None
        producer = self._producer
        producer.join()
        self._producer = None
        if producer.key != start:
            return None
        return producer.result()

    def close(self) -> None:
        """Wait for a fill being harvested in the background (nothing else to release)."""
        self._join_producer()

    def describe(self) -> str:
        return f"streamed in fills of {self.buffer_tokens} rows"

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
            self._served += take.numel()
            if self.position >= fill.rows.shape[0]:
                self._start, self.fill_index, self.position, self._fill = fill.end, fill.index + 1, 0, None
        self.batches += 1
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
        pass_, piece, pos = self._start
        return {
            "kind": "stream",
            **self._identity(),
            "fill": self.fill_index,
            "pass": pass_,
            "piece": piece,
            "start": None if pos is None else pos.to_dict(),
            "first_pass_fills": [p.to_dict() for p in self._first_pass_fills],
            "position": self.position,
            "fill_rows": None if self._fill is None else int(self._fill.rows.shape[0]),
            "dropped_rows": self.dropped_rows,
            "batches": self.batches,
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
        if "first_pass_fills" not in state:
            raise ActivationError(
                "--resume: the checkpoint's stream position predates passes in a new order; start afresh"
            )
        self.fill_index = int(state["fill"])
        pos = state["start"]
        self._start = (int(state["pass"]), int(state["piece"]), None if pos is None else TextPosition(**pos))
        self._first_pass_fills = [TextPosition(**p) for p in state["first_pass_fills"]]
        self.position = int(state["position"])
        self.dropped_rows = int(state["dropped_rows"])
        self.batches = int(state["batches"])
        self._served = self.batches * self.batch_size
        self._expect_rows = state["fill_rows"]
        self._join_producer()  # a fill harvested for the old position is not needed
        self._fill = None
