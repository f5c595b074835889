"""The run's ``--out`` folder, checked before any data is read.

``output_folder(cfg, is_main)`` is a context manager around the run:

- ``--out`` must be a folder (or not exist yet) that this process can write to; a file there, a
  read-only filesystem or a missing permission is an error at start-up, not after harvesting;
- a folder that holds a started or finished run (``checkpoint.pt``, ``sae_weights.safetensors``,
  a sweep's ``summary.json``, or a sweep's SAE folder ``l0_coefficient-*/`` or ``target_l0-*/``
  holding an SAE) is not written into unless ``--resume`` continues it or ``--overwrite``
  replaces it (then the old run's files are removed first, the old sweep's SAE folders'
  included, so nothing of it is mixed into the new one); ``--resume`` on a folder with an SAE
  but no checkpoint is refused too, since it would start over on top of the SAE;
- temp files left by a write that a kill interrupted (``.NAME.XXXXXXXX.tmp``) are removed;
- a folder this run created is removed again, with any parents it created, if the run fails and
  leaves it empty.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ..export import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from ..files import remove_stale_temp_files
from .checkpoint import CHECKPOINT_NAME
from .config import SWEEPABLE
from .errors import UserError
from .report.run_log import METRICS_NAME
from .report.sweep import SUMMARY_NAME

__all__ = ["OutputError", "RUN_FILES", "output_folder"]

# What marks a folder as holding a run: a checkpoint (started) or the SAE (finished).
RUN_MARKERS = (CHECKPOINT_NAME, SAE_WEIGHTS_FILENAME, SUMMARY_NAME)
# Every file a run writes into --out and a sweep into each SAE's folder (TensorBoard's folder
# aside): what --overwrite removes.
RUN_FILES = (
    CHECKPOINT_NAME,
    SAE_WEIGHTS_FILENAME,
    SAE_CFG_FILENAME,
    "eval.json",
    METRICS_NAME,
    "density.png",
    "curves.png",
    SUMMARY_NAME,
    "frontier.png",
)


class OutputError(UserError):
    """An --out folder that cannot or must not be written into."""


@contextlib.contextmanager
def output_folder(cfg, is_main: bool = True):
    """Check and prepare ``cfg.out`` (see the module's docstring); yields its Path. Only the main
    rank removes files; every rank checks, so all of them fail alike."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder: give a folder for the run's files")
    folders = _run_folders(out)
    held = [
        str((folder / name).relative_to(out)) for folder in folders for name in RUN_MARKERS if (folder / name).is_file()
    ]
    if held and not (cfg.resume or cfg.overwrite):
        raise OutputError(
            f"--out {out} already holds a run ({', '.join(held)}): continue it with --resume, "
            "replace it with --overwrite, or give another --out"
        )
    if cfg.resume and held and CHECKPOINT_NAME not in held:  # --resume would start over on a finished SAE
        raise OutputError(
            f"--resume: {out} holds a trained SAE but no {CHECKPOINT_NAME} to continue from: "
            "replace it with --overwrite (instead of --resume), or give another --out"
        )
    created = _make_folder(out)
    try:
        _check_writable(out)
        if is_main:
            for folder in folders:
                remove_stale_temp_files(folder)
            if cfg.overwrite:
                for folder in folders:
                    for name in RUN_FILES:
                        (folder / name).unlink(missing_ok=True)
        yield out
    except BaseException:
        _remove_if_empty(created)
        raise


def _run_folders(out: Path) -> list[Path]:
    """``out`` and, inside it, the SAE folders a sweep writes (``l0_coefficient-0.002``, ...)."""
    if not out.is_dir():
        return [out]
    sweeps = [p for p in sorted(out.iterdir()) if p.is_dir() and p.name.startswith(tuple(f"{s}-" for s in SWEEPABLE))]
    return [out, *sweeps]


def _make_folder(out: Path) -> list[Path]:
    """Create ``out`` and its missing parents; return the folders created, deepest first."""
    missing = []
    for folder in (out, *out.parents):
        if folder.exists():
            break
        missing.append(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {out}: cannot create the folder: {e.strerror or e}") from e
    return missing


def _check_writable(out: Path) -> None:
    """Create and remove a file in ``out``: the only test that also catches a read-only mount,
    a full disk's quota or an ACL (``os.access`` sees none of them, and root passes it always)."""
    try:
        fd, name = tempfile.mkstemp(dir=out, prefix=".write-check-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OutputError(f"--out {out}: cannot write there: {e.strerror or e}") from e


def _remove_if_empty(created: list[Path]) -> None:
    for folder in created:  # deepest first; stops at the first that is not empty
        try:
            folder.rmdir()
        except OSError:
            return
