"""The one root of every error whose message is written for the user.

The CLI and the demo catch ``DilsegError`` and show its message in one line; anything else
is a bug and keeps its traceback. Each stage raises its own subclass (``SourceError``,
``BackendError``, ``BuildError``, ...) defined beside the code that raises it, so callers can
tell them apart without matching class names. Those classes keep the builtin base they
always had (``ValueError`` for a bad value, ``RuntimeError`` for something that failed), so
code that caught the builtin still does.

An ``OSError`` is not a ``DilsegError``: a failed read or write that the user can fix (missing
file, permission, full disk) is turned into the stage's error where it happens, naming the
path, with :func:`os_errors_as`; any other ``OSError`` stays a bug with its traceback.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


class DilsegError(Exception):
    """An error written for the user: the message says what was wrong and what to do."""


class CliError(DilsegError):
    """A command line that asks for something impossible: printed as one line, exit status 2."""


@contextlib.contextmanager
def os_errors_as(error: type[DilsegError], path: str | Path, action: str) -> Iterator[None]:
    """Re-raise an ``OSError`` of the block as ``error("PATH: cannot ACTION: reason")``."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise error(f"{path}: cannot {action}: {reason}") from None


def first_line(message: object, limit: int = 300) -> str:
    """The first line of a library's message, at most ``limit`` characters: ONNX Runtime,
    OpenVINO and TensorRT append pages of C++ context that would bury what went wrong."""
    return (str(message).strip().splitlines() or [""])[0][:limit]
