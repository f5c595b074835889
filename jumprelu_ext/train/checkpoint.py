"""Crash-safe training checkpoints (resume support) for the JumpReLU SAE trainer.

A checkpoint is one ``torch.save`` file holding a plain dict (see ``save_checkpoint``). It is
written atomically: to a temporary file in the destination folder, flushed and fsynced, then
``os.replace``d onto the final name (and the folder fsynced where the OS allows it). A process
killed at any point therefore leaves either the previous checkpoint or the new one, never a
half-written file under the final name; a stray ``.tmp`` file may remain only after a hard kill
between creation and rename (the trainer removes those at start-up).

All content is ``torch.load(weights_only=True)``-compatible: tensors, dicts, lists, tuples,
numbers, strings, None. RNG states are converted accordingly (numpy's key array becomes a
list of ints, python ``random``'s state tuple becomes lists).
"""

import random
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write
from .errors import UserError

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT_VERSION = 1

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointError",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]


# ---------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state() -> dict:
    """Every RNG a training step can touch, as weights_only-loadable content.

    Keys: ``torch`` (CPU ByteTensor), ``cuda`` (list of ByteTensors, one per device, or None
    without CUDA), ``numpy`` (the legacy global ``np.random`` state as a dict of plain values)
    and ``python`` (``random.getstate()`` as lists).
    """
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "name": str(np_name),
            "keys": [int(k) for k in np_keys],
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": int(py_version), "internal": [int(v) for v in py_internal], "gauss_next": py_gauss},
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of ``capture_rng_state``. CUDA states are restored only when CUDA is available
    and the checkpoint has them (a CPU-only resume of a GPU run keeps the CPU streams exact)."""
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available():
        n = min(len(cuda_states), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(torch.as_tensor(cuda_states[i], dtype=torch.uint8).cpu(), i)
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            np.asarray(npst["keys"], dtype=np.uint32),
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["cached_gaussian"]),
        )
    )
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["internal"]), py["gauss_next"]))


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _required_keys(state: dict) -> tuple[str, ...]:
    """A single run's checkpoint holds its SAE and optimiser at the top level; a sweep's holds
    each SAE's under ``members`` (docs/trainer.md#several-saes-from-one-stream)."""
    return ("members", "step") if "members" in state else ("sae", "optimizer", "step")


class CheckpointError(UserError):
    """A checkpoint file that cannot be resumed from (truncated, corrupt, not a checkpoint)."""

    def __init__(self, path, problem: str):
        super().__init__(
            f"{path} {problem}: it cannot be resumed from; delete it to start the run over "
            "(or train into another --out)"
        )


def save_checkpoint(path, state: dict) -> Path:
    """Atomically write a training checkpoint to ``path`` (a file path).

    ``state`` is a dict; the trainer stores at least:
      ``sae`` (module state_dict), ``optimizer`` (optimizer state_dict), ``step`` (int)
    (a sweep: ``members``, each SAE's ``sae``, ``optimizer``, ... by name, instead of the first two),
    and normally also ``scheduler`` (LR-scheduler state_dict or None), ``rng``
    (``capture_rng_state()``), ``data`` (small dict describing the data iterator's position),
    ``config`` (the training config dict) and ``input_scale`` (the scalar c with E‖c·x‖² = 1).
    A ``format_version`` key is added. Content should be weights_only-compatible.
    """
    if not isinstance(state, dict):
        raise TypeError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
    missing = [k for k in _required_keys(state) if k not in state]
    if missing:
        raise ValueError(f"save_checkpoint: state is missing required keys {missing}")
    payload = dict(state)
    payload.setdefault("format_version", CHECKPOINT_FORMAT_VERSION)
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path, map_location="cpu", weights_only: bool = True) -> dict:
    """Read a checkpoint written by ``save_checkpoint``.

    Raises FileNotFoundError if ``path`` does not exist and ``CheckpointError`` (a ``UserError``,
    so a ``ValueError``; naming the file and what to do) if it cannot be read as a checkpoint
    (zero bytes, truncated, corrupt, not a dict, or missing required keys). torch's own message
    is left out: for a damaged file its advice (``weights_only=False``) would be wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "is empty (0 bytes)")
    with open(path, "rb"):  # a file that cannot be opened at all (permissions): the OSError names it
        pass
    try:
        # mmap: a caller that keeps part of a large checkpoint (a feature shard) reads only that part.
        state = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=True)
    except Exception as e:  # a truncated file: OSError (EINVAL) from mmap; else RuntimeError, EOFError, ...
        raise CheckpointError(path, f"is damaged (truncated or not a checkpoint; {type(e).__name__})") from e
    if not isinstance(state, dict):
        raise CheckpointError(
            path, f"is not a trainer checkpoint (it does not hold a dict but a {type(state).__name__})"
        )
    missing = [k for k in _required_keys(state) if k not in state]
    if missing:
        raise CheckpointError(path, f"is not a trainer checkpoint (it lacks {', '.join(missing)})")
    return state
