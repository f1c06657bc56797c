"""CUDA through pycuda's driver API: the GPU's facts, its primary context, and CUDA graphs.

Context discipline (``pycuda.autoinit`` breaks once inference moves to a worker thread): the
device's *primary* context is retained once and pushed/popped around every call, in whichever
thread makes it, so an engine loaded in one thread can run in another.
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..errors import DilsegError
from .deps import INSTALL_HINT, import_pycuda


@dataclass(frozen=True)
class Gpu:
    """One CUDA device as TensorRT engines are tied to it."""

    index: int
    name: str
    compute_capability: tuple[int, int]


def find_gpu(cuda: Any, device: int, error: type[DilsegError]) -> Gpu:
    """The facts of CUDA device ``device`` (no context needed), or ``error`` saying why not."""
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # pycuda raises its own driver errors
        raise error(f"CUDA is not usable here ({exc}); {INSTALL_HINT}") from None
    if not 0 <= device < count:
        raise error(f"GPU {device} does not exist (this machine has {count} CUDA device(s))")
    dev = cuda.Device(device)
    return Gpu(device, dev.name(), tuple(dev.compute_capability()))


def query_gpu(device: int, error: type[DilsegError]) -> Gpu:
    """``find_gpu`` with pycuda imported here (for callers that hold no pycuda module)."""
    return find_gpu(import_pycuda(error), device, error)


class PrimaryContext:
    """The device's primary context, retained once; ``active()`` makes it current in the calling
    thread for the duration of a block."""

    def __init__(self, cuda: Any, device: int) -> None:
        self.cuda = cuda
        self._ctx = cuda.Device(device).retain_primary_context()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self._ctx.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def push(self) -> None:
        self._ctx.push()

    def release(self) -> None:
        """Pop the context pushed by ``push()`` and give up the retained reference."""
        if self._ctx is None:
            return
        try:
            self.cuda.Context.pop()
        finally:
            self._ctx.detach()
            self._ctx = None


class CudaGraph:
    """Capture the work queued on a stream once, replay it with one launch.

    cuStreamBeginCapture_v2 / cuStreamEndCapture / cuGraphInstantiateWithFlags / cuGraphLaunch
    are CUDA driver API calls (CUDA >= 11.4); the stream is pycuda's (``stream.handle``).
    pycuda has no graph capture of its own.
    """

    THREAD_LOCAL = 1  # CU_STREAM_CAPTURE_MODE_THREAD_LOCAL

    def __init__(self, error: type[DilsegError]) -> None:
        self.error = error
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.graph = ctypes.c_void_p()
        self.exec = ctypes.c_void_p()

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise self.error(f"CUDA graph {what} failed (CUresult {rc})")

    def capture(self, stream_handle: int, enqueue: Callable[[], None]) -> None:
        s = ctypes.c_void_p(stream_handle)
        self._check(self.lib.cuStreamBeginCapture_v2(s, ctypes.c_int(self.THREAD_LOCAL)), "begin capture")
        try:
            enqueue()
        finally:
            rc = self.lib.cuStreamEndCapture(s, ctypes.byref(self.graph))
        self._check(rc, "end capture")
        self._check(self.lib.cuGraphInstantiateWithFlags(ctypes.byref(self.exec), self.graph, ctypes.c_ulonglong(0)),
                    "instantiate")

    def launch(self, stream_handle: int) -> None:
        self._check(self.lib.cuGraphLaunch(self.exec, ctypes.c_void_p(stream_handle)), "launch")

    def destroy(self) -> None:
        if self.exec:
            self.lib.cuGraphExecDestroy(self.exec)
            self.exec = ctypes.c_void_p()
        if self.graph:
            self.lib.cuGraphDestroy(self.graph)
            self.graph = ctypes.c_void_p()
