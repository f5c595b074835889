"""Reading cached activations for SAE training.

Activations live on disk as ``.npy`` or ``.safetensors`` files of shape [N, d_in], or as a folder
of such shards. ``open_activations`` indexes them without loading them (rows of both formats are
read through a memory map), ``ShuffledBatches`` turns them into an exactly resumable stream of
finite fp32 batches (the next one read on a background thread), and ``sample_statistics`` finds
the one scalar c with E‖c·x‖² = 1 that the recipe's ε and θ₀ are calibrated for
(docs/method.md#input-scale) and the rows' mean (the default recipe's initial b_dec).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..errors import UserError, first_line
from .read_ahead import ReadAhead

__all__ = [
    "ActivationError",
    "ActivationStore",
    "ShuffledBatches",
    "TensorStore",
    "estimate_scale",
    "open_activations",
    "sample_statistics",
    "split_holdout",
]

SUFFIXES = (".npy", ".safetensors")
READ_AHEAD_THREAD = "jumprelu-ext-read-ahead"
# safetensors spells dtypes its own way; map to numpy names so mixed-format folders compare.
_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_NP_DTYPES = ("float16", "float32", "float64")


class ActivationError(UserError):
    """Activations that cannot be used, with the file and the problem in the message."""


class _Shard:
    """One file: its row count, width and dtype, and a way to read rows from it."""

    def __init__(self, path: Path):
        self.path = path
        if path.stat().st_size == 0:
            raise ActivationError(f"{path}: file is empty")
        if path.suffix == ".npy":
            self._open_npy()
        elif path.suffix == ".safetensors":
            self._open_safetensors()
        else:
            raise ActivationError(f"{path}: unsupported extension {path.suffix!r} (expected .npy or .safetensors)")
        if len(self.shape) != 2:
            raise ActivationError(f"{path}: expected a 2-D [rows, d_in] array, got shape {tuple(self.shape)}")
        self.num_rows, self.d_in = int(self.shape[0]), int(self.shape[1])
        if self.num_rows == 0:
            raise ActivationError(f"{path}: has zero rows")
        if self.d_in == 0:
            raise ActivationError(f"{path}: has d_in = 0")

    def _open_npy(self):
        try:
            # mmap: training touches a random subset per batch, never the whole file at once.
            self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # truncated header, not an npy file, object arrays, ...
            raise ActivationError(f"{self.path}: cannot read as .npy ({e})") from e
        self.shape = self._array.shape
        self.dtype = self._array.dtype.name
        if self.dtype not in _NP_DTYPES:
            raise ActivationError(f"{self.path}: unsupported dtype {self.dtype} (expected one of {_NP_DTYPES})")

    def _open_safetensors(self):
        try:
            with safe_open(str(self.path), framework="pt") as f:
                names = list(f.keys())
                if not names:
                    raise ActivationError(f"{self.path}: contains no tensors")
                if len(names) == 1:
                    self._name = names[0]
                elif "activations" in names:
                    self._name = "activations"
                else:
                    raise ActivationError(
                        f"{self.path}: holds {len(names)} tensors {sorted(names)} and none is named 'activations'"
                    )
                sl = f.get_slice(self._name)
                self.shape = sl.get_shape()
                st_dtype = sl.get_dtype()
        except ActivationError:
            raise
        except Exception as e:  # bad header, truncated file, ...
            raise ActivationError(f"{self.path}: cannot read as .safetensors ({e})") from e
        if st_dtype not in _ST_DTYPES:
            raise ActivationError(f"{self.path}: unsupported dtype {st_dtype} (expected one of {sorted(_ST_DTYPES)})")
        self.dtype = _ST_DTYPES[st_dtype]
        # Where the tensor's bytes are (safe_open has checked the header): rows are then read
        # through a memory map like .npy, touching only their own pages.
        with open(self.path, "rb") as f:
            header_bytes = int.from_bytes(f.read(8), "little")
            begin = json.loads(f.read(header_bytes))[self._name]["data_offsets"][0]
        self._data_offset = 8 + header_bytes + begin

    def read(self, local: np.ndarray) -> torch.Tensor:
        """Rows ``local`` (sorted ascending) of this shard as an fp32 tensor."""
        if self.path.suffix == ".npy":
            # fp64 values beyond the fp32 range become inf here, and the batcher drops them as non-finite.
            with np.errstate(over="ignore"):
                return torch.from_numpy(np.asarray(self._array[local], dtype=np.float32))
        # Mapped afresh for each read: a file truncated since it was opened is an error here, not a
        # SIGBUS when a missing page is touched. bfloat16, which numpy lacks, is read as its bits.
        stored = np.uint16 if self.dtype == "bfloat16" else np.dtype(self.dtype).newbyteorder("<")
        try:
            array = np.memmap(self.path, dtype=stored, mode="r", offset=self._data_offset, shape=tuple(self.shape))
        except (OSError, ValueError) as e:
            raise ActivationError(f"{self.path}: cannot read its rows ({first_line(e)}): truncated or replaced?") from e
        block = torch.from_numpy(np.ascontiguousarray(array[local]))
        return (block.view(torch.bfloat16) if self.dtype == "bfloat16" else block).to(torch.float32)


class ActivationStore:
    """A read-only [num_rows, d_in] matrix spread over one or more shards."""

    def __init__(self, shards: list[_Shard]):
        self.shards = shards
        self.d_in = shards[0].d_in
        self.dtype = shards[0].dtype
        # offsets[i] is the first global row of shard i; offsets[-1] is the total.
        self.offsets = np.cumsum([0] + [s.num_rows for s in shards]).astype(np.int64)
        self.num_rows = int(self.offsets[-1])

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return f"ActivationStore(num_rows={self.num_rows}, d_in={self.d_in}, dtype={self.dtype}, shards={len(self.shards)})"

    def rows(self, indices) -> torch.Tensor:
        """Rows at global ``indices`` as a float32 [len(indices), d_in] CPU tensor, in the given order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = torch.empty((idx.size, self.d_in), dtype=torch.float32)
        if idx.size == 0:
            return out
        if idx.min() < 0 or idx.max() >= self.num_rows:
            raise ActivationError(f"row index out of range [0, {self.num_rows}): min {idx.min()}, max {idx.max()}")
        # Read in ascending order (sequential disk access on the mmap), scatter back to the caller's order.
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        shard_of = np.searchsorted(self.offsets, sorted_idx, side="right") - 1
        bounds = np.searchsorted(shard_of, np.arange(len(self.shards) + 1), side="left")
        for s, shard in enumerate(self.shards):
            a, b = bounds[s], bounds[s + 1]
            if a == b:
                continue
            out[torch.from_numpy(order[a:b])] = shard.read(sorted_idx[a:b] - self.offsets[s])
        return out


class TensorStore:
    """An in-memory [num_rows, d_in] matrix (e.g. activations just harvested from a model), on any
    device, with the ``rows`` interface of ``ActivationStore`` so ``ShuffledBatches`` reads both."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.dim() != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
            raise ActivationError(f"expected a non-empty [rows, d_in] tensor, got shape {tuple(tensor.shape)}")
        self.tensor = tensor.float()
        self.num_rows, self.d_in = tensor.shape
        self.dtype = "float32"

    def __len__(self) -> int:
        return self.num_rows

    def rows(self, indices) -> torch.Tensor:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1), device=self.tensor.device)
        return self.tensor[idx]


def open_activations(path, expected_d_in: int | None = None) -> ActivationStore:
    """Open a ``.npy`` / ``.safetensors`` file or a folder of them (shards in name order)."""
    path = Path(path)
    if not path.exists():
        raise ActivationError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise ActivationError(f"{path}: folder holds no .npy or .safetensors files")
        _check_manifest(path, files)
    else:
        files = [path]
    shards = [_Shard(p) for p in files]
    first = shards[0]
    for s in shards[1:]:
        if s.d_in != first.d_in:
            raise ActivationError(f"{s.path}: d_in {s.d_in} does not match {first.path.name} (d_in {first.d_in})")
        if s.dtype != first.dtype:
            raise ActivationError(f"{s.path}: dtype {s.dtype} does not match {first.path.name} (dtype {first.dtype})")
    if expected_d_in is not None and first.d_in != expected_d_in:
        raise ActivationError(f"{path}: d_in is {first.d_in} but the SAE expects {expected_d_in}")
    return ActivationStore(shards)


def _check_manifest(folder: Path, files: list[Path]) -> None:
    """A folder written by ``python -m jumprelu_ext.cache`` lists its shards' byte sizes in
    meta.json: a shard of another size is truncated or was replaced. (Cheap: no data is read.)"""
    try:
        listed = json.loads((folder / "meta.json").read_text())["shard_files"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no manifest (or not one of ours): nothing to check against
    sizes = {entry["name"]: entry["bytes"] for entry in listed}
    for f in files:
        if f.name in sizes and f.stat().st_size != sizes[f.name]:
            raise ActivationError(
                f"{f}: {f.stat().st_size} bytes, but meta.json says {sizes[f.name]}: the shard is truncated or damaged"
            )


def split_holdout(store_or_num_rows, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices at random into (train, eval), both sorted; eval holds ``fraction`` of them
    (none for 0)."""
    n = store_or_num_rows if isinstance(store_or_num_rows, (int, np.integer)) else store_or_num_rows.num_rows
    if not 0.0 <= fraction < 1.0:
        raise ActivationError(f"holdout fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return np.arange(n), np.arange(0)
    n_eval = int(round(n * fraction))
    if n_eval == 0 or n_eval == n:
        raise ActivationError(f"holdout fraction {fraction} of {n} rows leaves an empty train or eval split")
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def _read_planned(read, rows: np.ndarray, epoch: int, position: int) -> tuple[torch.Tensor, int, int]:
    """A planned batch read (on the read-ahead thread): its rows, the epoch and position after it."""
    return read(rows), epoch, position


class ShuffledBatches:
    """Endless fp32 batches on ``device``, reshuffled every epoch, exactly resumable.

    Epoch e visits ``indices`` in the order of PCG64(seed + e); batch k is the rows at stream
    positions [k·batch_size, (k+1)·batch_size) (spanning epoch ends), so the stream is a pure
    function of (seed, epoch, position): that is all ``state_dict`` needs to save. Rows with
    NaN/Inf are dropped, so a batch shrinks by them (and may be empty); ``dropped_rows`` counts
    every drop (a bad row is counted again each epoch it is met).

    ``shard=(rank, world_size)`` is for data-parallel training: every rank walks the same global
    stream and reads only its contiguous share of each global batch, so the ranks' batches
    together are exactly the single-process batch, whatever the world size.

    With ``read_ahead`` (the default) the next batch's rows are read from the store on a
    background thread while the caller trains on this one: the same batches, one batch of memory
    more. ``total_rows`` (steps × batch size) stops it reading past the run's last batch, so no
    thread is left when the run ends; ``close()`` waits for one in any case.
    """

    def __init__(
        self,
        store,
        batch_size: int,
        seed: int = 0,
        device="cpu",
        indices=None,
        shard=(0, 1),
        read_ahead: bool = True,
        total_rows: int | None = None,
    ):
        if batch_size <= 0:
            raise ActivationError(f"batch_size must be positive, got {batch_size}")
        self.store = store
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.rank, self.world_size = shard
        idx = np.arange(store.num_rows, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or idx.size == 0:
            raise ActivationError("indices must be a non-empty 1-D array of row numbers")
        if idx.min() < 0 or idx.max() >= store.num_rows:
            raise ActivationError(f"indices out of range [0, {store.num_rows})")
        self.indices = idx
        self.epoch = 0
        self.position = 0
        self.dropped_rows = 0
        self._perm_epoch = None  # epoch whose permutation is cached in self._perm
        self.read_ahead, self.total_rows = read_ahead, total_rows
        self._pending: ReadAhead | None = None  # the next batch's rows, read for its key (epoch, position)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            rng = np.random.Generator(np.random.PCG64(self.seed + epoch))
            self._perm = self.indices[rng.permutation(self.indices.size)]
            self._perm_epoch = epoch
        return self._perm

    def _plan(self, epoch: int, position: int) -> tuple[np.ndarray, int, int]:
        """(this rank's row numbers of the batch at stream position (epoch, position), the epoch and
        position after it)."""
        parts, need = [], self.batch_size
        while need:
            perm = self._permutation(epoch)
            take = perm[position : position + need]
            parts.append(take)
            need -= take.size
            position += take.size
            if position >= perm.size:
                epoch, position = epoch + 1, 0
        rows = np.concatenate(parts)
        share = -(-rows.size // self.world_size)  # ceil: the last rank may get fewer rows
        return rows[self.rank * share : (self.rank + 1) * share], epoch, position

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        key, pending = (self.epoch, self.position), self._pending
        self._pending = None
        if pending is not None and pending.key == key:
            x, self.epoch, self.position = pending.result()
        else:
            rows, self.epoch, self.position = self._plan(*key)
            x = self.store.rows(rows)
        served = self.epoch * self.indices.size + self.position  # stream positions so far
        if self.read_ahead and (self.total_rows is None or served < self.total_rows):
            after = (self.epoch, self.position)
            plan = self._plan(*after)  # planned here: the plan caches a permutation
            self._pending = ReadAhead(partial(_read_planned, self.store.rows, *plan), name=READ_AHEAD_THREAD, key=after)
        finite = torch.isfinite(x).all(dim=1)
        kept = int(finite.sum())
        self.dropped_rows += x.shape[0] - kept
        return (x if kept == x.shape[0] else x[finite]).to(self.device)

    @property
    def rows_per_pass(self) -> int:
        """Rows in one epoch."""
        return int(self.indices.size)

    def describe(self) -> str:
        return f"{self.indices.size} training rows"

    def close(self) -> None:
        """Wait for a batch being read in the background and drop it."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "dropped_rows": self.dropped_rows,
            "seed": self.seed,
            "num_indices": int(self.indices.size),
        }

    def load_state_dict(self, state: dict) -> None:
        # Refuse a state from another stream: it would silently replay different data.
        if state["seed"] != self.seed or state["num_indices"] != self.indices.size:
            raise ActivationError(
                f"state is for seed {state['seed']} over {state['num_indices']} rows, "
                f"this iterator has seed {self.seed} over {self.indices.size} rows"
            )
        if not 0 <= state["position"] < self.indices.size:
            raise ActivationError(f"state position {state['position']} outside [0, {self.indices.size})")
        self.close()  # a batch read ahead for the old position is not needed
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.dropped_rows = int(state["dropped_rows"])


def estimate_scale(source, num_rows: int = 65536, seed: int = 0) -> float:
    """The scalar c of ``sample_statistics``."""
    return sample_statistics(source, num_rows, seed)[0]


def sample_statistics(source, num_rows: int = 65536, seed: int = 0) -> tuple[float, torch.Tensor]:
    """(c, mean) over a random sample of finite rows: the scalar c with mean ‖c·x‖² = 1, that is
    c = 1/sqrt(mean ‖x‖²), and the rows' mean (fp64, unscaled).

    ``source`` is an ActivationStore or a ShuffledBatches (its store and index subset are used;
    the iterator is not advanced, so estimating does not change what training sees).
    """
    if isinstance(source, ShuffledBatches):
        store, pool = source.store, source.indices
    else:
        store, pool = source, np.arange(source.num_rows, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(seed))
    sample = pool if num_rows >= pool.size else rng.choice(pool, size=num_rows, replace=False)
    x = store.rows(sample).double()
    x = x[torch.isfinite(x).all(dim=1)]
    if x.shape[0] == 0:
        raise ActivationError("cannot estimate the input scale: every sampled row is NaN/Inf")
    mean_sq = float((x * x).sum(dim=1).mean())
    if not mean_sq > 0.0 or not np.isfinite(mean_sq):
        raise ActivationError(f"cannot estimate the input scale: mean ‖x‖² over the sample is {mean_sq}")
    return 1.0 / float(np.sqrt(mean_sq)), x.mean(dim=0)
