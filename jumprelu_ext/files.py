"""Crash-safe file writes: a temp file next to the target, flushed and fsynced, then renamed onto
it, so a process killed at any point leaves the old file or the new one, never half of one."""

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_bytes"]


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename inside it is durable; a no-op where unsupported (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write_fn) -> Path:
    """Call ``write_fn(fileobj)`` on a temp file next to ``path``, fsync it, then os.replace it
    onto ``path``. On any failure the temp file is removed and ``path`` is left untouched."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=directory, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    tmp_name = tmp.name
    try:
        with tmp:
            write_fn(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + os.replace)."""
    return atomic_write(path, lambda f: f.write(data))
