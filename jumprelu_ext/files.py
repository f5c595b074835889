"""Crash-safe file writes: a temp file next to the target, flushed and fsynced, then renamed onto
it, so a process killed at any point leaves the old file or the new one, never half of one.

The file gets the mode any ordinary write would give a new file, 0o666 less the process's umask
(``tempfile`` alone would leave it 0o600, readable by its owner only). A process killed between
creating the temp file and renaming it leaves ``.NAME.XXXXXXXX.tmp`` behind; ``remove_stale_temp_files``
clears them (the trainer calls it on its ``--out`` at start-up).
"""

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_bytes", "remove_stale_temp_files"]

TEMP_SUFFIX = ".tmp"


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


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (``os.umask`` can only be
    read by setting it, which would briefly affect files other threads create)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write_fn) -> Path:
    """Call ``write_fn(fileobj)`` on a temp file next to ``path``, fsync it, then os.replace it
    onto ``path``. On any failure the temp file is removed and ``path`` is left untouched. The
    file's mode is 0o666 less the umask, as for any newly created file."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as tmp:
            os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp creates it 0o600
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


def remove_stale_temp_files(directory) -> list[Path]:
    """Remove the temp files (``.NAME.XXXXXXXX.tmp``) that writes into ``directory`` killed before
    their rename left behind; returns those removed. Call it only while nothing writes there."""
    removed = []
    for p in Path(directory).glob(f".*{TEMP_SUFFIX}"):
        if p.is_file():
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            removed.append(p)
    return removed
