"""CUDA through pycuda's driver API: the GPU's facts, its primary context, and CUDA graphs.

Context discipline (``pycuda.autoinit`` breaks once inference moves to a worker thread): the
device's *primary* context is retained once and pushed/popped around every call, in whichever
thread makes it, so an engine loaded in one thread can run in another.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
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


def libcuda() -> ctypes.CDLL:
    """The CUDA driver library, for the calls pycuda does not wrap (graphs, the context stack)."""
    return ctypes.CDLL("libcuda.so.1")


def detach_repair(ours: int, beneath: int | None) -> list[tuple[str, int]]:
    """The driver context-stack steps that undo what pycuda leaves after detaching our primary
    context while it is pycuda's current one (``push()`` then ``detach()``).

    pycuda's ``detach`` of the current context releases it (``cuDevicePrimaryCtxRelease``, which
    unlike ``cuCtxDestroy`` never pops it from the driver's stack), drops it from pycuda's own
    stack and pushes the context beneath, if any, on the driver's: the driver's stack is left
    ``[..., ours, beneath]`` or ``[..., ours]``. Each ("pop", h) must pop handle h; ("push", h)
    pushes it back.
    """
    if beneath is None:
        return [("pop", ours)]
    return [("pop", beneath), ("pop", ours), ("push", beneath)]


class PrimaryContext:
    """The device's primary context, retained once; ``active()`` makes it current in the calling
    thread for the duration of a block, in any thread.

    ``release()`` gives the reference back exactly once, from any thread, and leaves the calling
    thread's context stack as it found it. pycuda's own ``detach()`` does neither from the state
    one would call it in (popped, or another thread than the one that retained): it then pushes
    the context, releases it and leaves it current, and from another thread it releases nothing.
    Detached while current (pushed just before), pycuda releases it in any thread; what that
    leaves on the driver's stack is undone by ``detach_repair``.
    """

    def __init__(self, cuda: Any, device: int) -> None:
        self.cuda = cuda
        self.device = device
        self._lock = threading.Lock()
        self._ctx = cuda.Device(device).retain_primary_context()

    @property
    def released(self) -> bool:
        return self._ctx is None

    def _context(self) -> Any:
        ctx = self._ctx
        if ctx is None:
            raise DilsegError(f"the CUDA context of GPU {self.device} was released already")
        return ctx

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self._context().push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def release(self) -> None:
        """Give up the retained reference (idempotent, any thread). Call it outside ``active()``,
        once everything made in the context is freed."""
        with self._lock:
            ctx, self._ctx = self._ctx, None
        if ctx is None:
            return
        current = self.cuda.Context.get_current()  # pycuda's current context in this thread, if any
        beneath = int(current.handle) if current is not None else None
        ctx.push()
        ctx.detach()
        lib = libcuda()
        for step, handle in detach_repair(int(ctx.handle), beneath):
            if step == "push":
                _check(lib.cuCtxPushCurrent_v2(ctypes.c_void_p(handle)), "cuCtxPushCurrent")
                continue
            popped = ctypes.c_void_p()
            _check(lib.cuCtxPopCurrent_v2(ctypes.byref(popped)), "cuCtxPopCurrent")
            if (popped.value or 0) != handle:  # not what pycuda left there: put it back, say so
                if popped.value:
                    lib.cuCtxPushCurrent_v2(popped)
                raise DilsegError(f"GPU {self.device}'s CUDA context was released, but this thread's context "
                                  f"stack is not as pycuda leaves it (found {popped.value or 0:#x} where "
                                  f"{handle:#x} was expected): other code pushes CUDA contexts here")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise DilsegError(f"{what} failed (CUresult {rc})")


class CudaGraph:
    """Capture the work queued on a stream once, replay it with one launch.

    cuStreamBeginCapture_v2 / cuStreamEndCapture / cuGraphInstantiateWithFlags / cuGraphLaunch
    are CUDA driver API calls (CUDA >= 11.4); the stream is pycuda's (``stream.handle``).
    pycuda has no graph capture of its own.
    """

    THREAD_LOCAL = 1  # CU_STREAM_CAPTURE_MODE_THREAD_LOCAL

    def __init__(self, error: type[DilsegError]) -> None:
        self.error = error
        self.lib = libcuda()
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
