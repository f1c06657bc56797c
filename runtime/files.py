"""Files written complete or not at all, and content hashes: shared by the exporter, the
trainer, the engine builder and the scripts (torch-free, so the runtime can use it)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import DilsegError

# Read once at import: os.umask can only be read by setting it, and setting it while other
# threads create files (the pipeline's sinks) would race.
UMASK = os.umask(0o022)
os.umask(UMASK)


class OutputError(DilsegError, OSError):
    """An output file cannot be written (missing or read-only folder, full disk): the message
    names the file. Still an ``OSError``, so code that handles failed writes keeps doing so."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename over ``path``: the file is complete or absent, never half written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: folder {parent} is not writable")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create a file in {parent}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        try:
            write(tmp)
            # mkstemp creates 0600 and some writers (safetensors) recreate the file: the finished
            # file gets the permissions a plain open() would give, whoever wrote it.
            os.chmod(tmp, 0o666 & ~UMASK)
            os.replace(tmp, path)
        except OutputError:
            raise
        except OSError as exc:  # full disk, quota, I/O error: nothing was replaced
            raise OutputError(f"{path}: cannot write it: {exc.strerror or exc}; nothing was written") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes | memoryview, fsync: bool = False) -> None:
    """``fsync`` for artifacts that took minutes to make (engines); per-frame outputs skip it."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    atomic_write(path, write)
