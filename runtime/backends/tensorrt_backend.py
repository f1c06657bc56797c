"""TensorRT backend: runs a dilseg engine (or builds and caches one from an .onnx) through pycuda.

CUDA context discipline (pycuda.autoinit breaks once inference moves to a worker thread):
the device's *primary* context is retained once and pushed/popped around every call, in
whichever thread makes it, so load() may run in one thread and infer() in another. Buffers
(page-locked host + device) are allocated once per input shape; copies and
``execute_async_v3`` run on the backend's own stream; only the label map comes back.
close() frees TensorRT objects and buffers while the context is current, then pops and
releases the context.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..artifact import read_onnx_meta
from ..engine_cache import (EngineError, RunningFacts, cached_engine_path, check_runs_here, decide, load_sidecar)
from ..metadata import MetadataError, ModelMeta
from .base import BackendError

INSTALL_HINT = ("desktop/server GPU: `pip install 'dilseg[trt]'` (tensorrt + pycuda); Jetson: TensorRT comes with "
                "JetPack (JetPack 6 ships 10.3), install pycuda with pip, and use a venv made with "
                "`--system-site-packages` so JetPack's tensorrt is visible; or run with --backend onnxruntime")

MAX_SHAPES = 4  # buffer sets kept for a dynamic engine (one per input shape seen recently)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendError(f"the TensorRT backend needs the tensorrt Python package, which is missing ({exc}); "
                           f"{INSTALL_HINT}") from None
    return trt


def import_pycuda():
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise BackendError(f"the TensorRT backend needs pycuda, which is missing ({exc}); {INSTALL_HINT}") from None
    return cuda


# -- CUDA graphs through the driver API (pycuda has no graph capture) -----------------------------

class CudaGraph:
    """Capture the work queued on a stream once, replay it with one launch.

    cuStreamBeginCapture_v2 / cuStreamEndCapture / cuGraphInstantiateWithFlags / cuGraphLaunch
    are CUDA driver API calls (CUDA >= 11.4); the stream is pycuda's (``stream.handle``).
    """

    THREAD_LOCAL = 1  # CU_STREAM_CAPTURE_MODE_THREAD_LOCAL

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.graph = ctypes.c_void_p()
        self.exec = ctypes.c_void_p()

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise BackendError(f"CUDA graph {what} failed (CUresult {rc})")

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


@dataclass
class _Buffers:
    """Everything allocated for one input shape."""

    shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    host_in: np.ndarray
    dev_in: object
    host_out: np.ndarray
    dev_out: object
    graph: CudaGraph | None = None
    graph_failed: str | None = None
    extra: dict = field(default_factory=dict)

    def free(self) -> None:
        if self.graph is not None:
            self.graph.destroy()
        for d in (self.dev_in, self.dev_out):
            d.free()
        for h in (self.host_in, self.host_out):
            if getattr(h, "base", None) is not None:
                h.base.free()


class TensorRTBackend:
    """``TensorRTBackend(path, **opts).load()``; ``path`` is a .engine (with its sidecar) or an .onnx
    (an engine is built once on this GPU and cached beside it, rebuilt when anything changed).

    Options: device (CUDA device index), cuda_graph (capture copies + inference per shape and
    replay it), engine (where to cache the engine of an .onnx), fp16, min_shape/opt_shape/max_shape,
    workspace_mib, timing_cache, dla_core (as `dilseg build`), rebuild (force a build), progress,
    log (callable for messages).
    """

    name = "tensorrt"

    def __init__(self, path: str | Path, device: int = 0, cuda_graph: bool = False, engine: str | Path | None = None,
                 fp16: bool = False, min_shape: str | None = None, opt_shape: str | None = None,
                 max_shape: str | None = None, workspace_mib: int = 1024, timing_cache: str | None = None,
                 rebuild: bool = False, progress: bool = True, log: Callable[[str], None] | None = None,
                 dla_core: int | None = None, **unknown) -> None:
        if unknown:
            hint = " (threads and providers are ONNX Runtime options)" if {"threads", "providers"} & set(unknown) else ""
            raise BackendError(f"the TensorRT backend has no option(s) {', '.join(sorted(unknown))}{hint}")
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in (".engine", ".onnx"):
            raise BackendError(f"{self.path}: the TensorRT backend runs a .engine (from `dilseg build`) or builds "
                               "one from an .onnx; got neither")
        if not self.path.is_file():
            raise BackendError(f"{self.path}: no such model file")
        self.device = int(device)
        self.cuda_graph = bool(cuda_graph)
        self.engine_path = Path(engine) if engine else (self.path if suffix == ".engine" else None)
        self.build_args = dict(fp16=fp16, min_shape=min_shape, opt_shape=opt_shape, max_shape=max_shape,
                               workspace_mib=workspace_mib, timing_cache=timing_cache, progress=progress,
                               device=self.device, dla_core=dla_core)
        self.rebuild = rebuild
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        # Fail early and clearly on a machine without TensorRT or pycuda.
        self.trt = import_tensorrt()
        self.cuda = import_pycuda()
        if suffix == ".engine":
            self.sidecar = load_sidecar(self.path)
            self.meta: ModelMeta = ModelMeta.from_dict(self.sidecar["meta"])
        else:
            self.sidecar = None
            try:
                self.meta = read_onnx_meta(self.path)
            except MetadataError as exc:
                raise BackendError(str(exc)) from None
        self.last_timings: dict[str, float] = {}
        self.decision = None
        self._ctx = None
        self._lock = threading.Lock()
        self._runtime = self._engine = self._context = self._stream = None
        self._events = []
        self._buffers: dict[tuple, _Buffers] = {}
        self._current_shape = None
        self._gpu_frame = self._pre = self._render = None
        self.gpu_preprocess_error: str | None = None  # why the CUDA kernels could not be used

    # -- context ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _active(self):
        """Make the retained primary context current in this thread for the duration."""
        if self._ctx is None:
            raise BackendError("the TensorRT backend is not loaded (or already closed); call load() first")
        self._ctx.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    # -- load ------------------------------------------------------------------------------

    def load(self) -> "TensorRTBackend":
        if self._engine is not None:
            return self
        cuda, trt = self.cuda, self.trt
        try:
            cuda.init()
            count = cuda.Device.count()
        except Exception as exc:  # pycuda's driver errors
            raise BackendError(f"CUDA is not usable here ({exc}); {INSTALL_HINT}") from None
        if self.device >= count:
            raise BackendError(f"GPU {self.device} does not exist (this machine has {count} CUDA device(s))")
        dev = cuda.Device(self.device)
        self._ctx = dev.retain_primary_context()
        try:
            with self._active():
                from ..trt_compat import detect

                self.caps = detect(trt)
                running = RunningFacts(str(self.caps.version), dev.name(), tuple(dev.compute_capability()))
                if self.sidecar is None:
                    self.engine_path = self._build_or_reuse(running)
                self._open_engine(running)
        except BaseException:
            self.close()
            raise
        return self

    def _build_or_reuse(self, running: RunningFacts) -> Path:
        """The cached engine for our .onnx, (re)built here when anything it depends on changed."""
        from dilseg.export.trt_build import BuildError, BuildOptions, build_engine, expected_key, plan_for, prepare

        try:
            options = BuildOptions(**self.build_args)
            prepared = prepare(self.path, self.engine_path, options)
            plan = plan_for(self.caps, prepared, running.compute_capability)
            engine_path = self.engine_path or cached_engine_path(self.path, prepared.info.sha256, plan.engine_precision)
            engine_path.parent.mkdir(parents=True, exist_ok=True)
            key = expected_key(prepared, str(self.caps.version), (running.gpu_name, running.compute_capability),
                               plan.engine_precision)
            self.decision = decide(engine_path, key)
            if self.rebuild:
                self.decision.reuse, self.decision.reasons = False, ["a rebuild was asked for"]
            self.log(str(self.decision))
            if not self.decision.reuse:
                result = build_engine(self.path, engine_path, options, log=self.log, prepared=prepared)
                self.log(f"built {engine_path} in {result.seconds:.1f} s")
        except BuildError as exc:
            raise BackendError(str(exc)) from None
        return engine_path

    def _open_engine(self, running: RunningFacts) -> None:
        trt, cuda = self.trt, self.cuda
        side = load_sidecar(self.engine_path)
        check_runs_here(self.engine_path, side, running)
        data = self.engine_path.read_bytes()
        import hashlib

        # Hash the bytes TensorRT will see (not the file a moment earlier): truncated or swapped -> refused.
        digest = hashlib.sha256(data).hexdigest()
        if digest != side["engine_sha256"] or len(data) != int(side.get("engine_size", len(data))):
            raise EngineError(f"{self.engine_path}: the engine ({len(data)} bytes, sha256 {digest[:12]}…) is not the one "
                              f"its sidecar describes ({side.get('engine_size')} bytes, sha256 "
                              f"{str(side['engine_sha256'])[:12]}…): truncated, corrupt or replaced; rebuild it with "
                              "`dilseg build`")
        self.sidecar = side
        self.meta = ModelMeta.from_dict(side["meta"])
        from dilseg.export.trt_build import make_logger

        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        if side.get("version_compatible") and self.caps.engine_host_code_allowed:
            # A version-compatible engine carries its own lean runtime: host code TensorRT must be allowed to run.
            self._runtime.engine_host_code_allowed = True
        if side.get("dla_core") is not None:
            self._runtime.DLA_core = int(side["dla_core"])
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise EngineError(f"{self.engine_path}: TensorRT {running.tensorrt_version} could not deserialize it: "
                              + (" | ".join(self._logger.errors[-3:]) or "no reason given")
                              + "; rebuild it on this machine with `dilseg build`")
        self._check_io()
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"{self.engine_path}: could not create an execution context (out of GPU memory?): "
                              + " | ".join(self._logger.errors[-3:]))
        self._stream = cuda.Stream()
        self._events = [cuda.Event() for _ in range(6)]

    def _check_io(self) -> None:
        trt, e = self.trt, self._engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        ins = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1 or not outs:
            raise EngineError(f"{self.engine_path}: expected one image input and a label output, found inputs {ins} "
                              f"and outputs {outs}")
        self.input_name, self.output_name = ins[0], outs[0]
        self.input_dtype = np.dtype(trt.nptype(e.get_tensor_dtype(self.input_name)))
        self.output_dtype = np.dtype(trt.nptype(e.get_tensor_dtype(self.output_name)))
        if self.meta.output_kind == "labels" and self.output_dtype not in (np.dtype(np.int32), np.dtype(np.uint8)):
            raise EngineError(f"{self.engine_path}: its output {self.output_name!r} is {self.output_dtype}, not int32 "
                              "or uint8 labels as the metadata says; rebuild it from a current `dilseg export onnx`")
        shape = tuple(int(d) for d in e.get_tensor_shape(self.input_name))
        self.dynamic = any(d < 0 for d in shape)
        self.profile = tuple(tuple(int(d) for d in s) for s in e.get_tensor_profile_shape(self.input_name, 0)) \
            if self.dynamic else (shape, shape, shape)

    # -- buffers ---------------------------------------------------------------------------

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        lo, _, hi = self.profile
        if len(shape) != 4 or any(not lo[i] <= shape[i] <= hi[i] for i in range(4)):
            fmt = lambda s: "x".join(map(str, s))  # noqa: E731
            raise BackendError(f"input {fmt(shape)} is outside the engine's shape profile "
                               f"{fmt(lo)}..{fmt(hi)}; rebuild with a wider --min/--max")

    def _buffers_for(self, shape: tuple[int, ...]) -> _Buffers:
        bufs = self._buffers.get(shape)
        if bufs is None:
            self._check_shape(shape)
            if not self._context.set_input_shape(self.input_name, shape):
                raise BackendError(f"TensorRT refused input shape {shape}: " + " | ".join(self._logger.errors[-3:]))
            out_shape = tuple(int(d) for d in self._context.get_tensor_shape(self.output_name))
            if len(self._buffers) >= MAX_SHAPES:
                oldest = next(iter(self._buffers))
                self._buffers.pop(oldest).free()
            cuda = self.cuda
            host_in = cuda.pagelocked_empty(shape, self.input_dtype)
            host_out = cuda.pagelocked_empty(out_shape, self.output_dtype)
            bufs = _Buffers(shape, out_shape, host_in, cuda.mem_alloc(host_in.nbytes), host_out,
                            cuda.mem_alloc(host_out.nbytes))
            self._buffers[shape] = bufs
            self._current_shape = None
        if self._current_shape != shape:
            if self.dynamic and not self._context.set_input_shape(self.input_name, shape):
                raise BackendError(f"TensorRT refused input shape {shape}")
            self._context.set_tensor_address(self.input_name, int(bufs.dev_in))
            self._context.set_tensor_address(self.output_name, int(bufs.dev_out))
            self._current_shape = shape
        return bufs

    # -- inference -------------------------------------------------------------------------

    def _enqueue(self, bufs: _Buffers, upload: bool = True) -> None:
        s = self._stream
        if upload:
            self.cuda.memcpy_htod_async(bufs.dev_in, bufs.host_in, s)
        if not self._context.execute_async_v3(s.handle):
            raise BackendError("TensorRT execute_async_v3 failed: " + " | ".join(self._logger.errors[-3:]))
        self.cuda.memcpy_dtoh_async(bufs.host_out, bufs.dev_out, s)

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        """NCHW float32 tensor -> the engine's output (int32/uint8 labels NxHxW, or logits)."""
        if tensor.ndim != 4:
            raise BackendError(f"expected an NCHW tensor, got shape {tensor.shape}")
        with self._lock, self._active():
            bufs = self._buffers_for(tuple(int(d) for d in tensor.shape))
            np.copyto(bufs.host_in, tensor, casting="same_kind" if self.input_dtype == tensor.dtype else "unsafe")
            self._run(bufs, upload=True)
            return bufs.host_out.copy()

    def _run(self, bufs: _Buffers, upload: bool) -> None:
        e, s = self._events, self._stream
        if self.cuda_graph and bufs.graph is None and bufs.graph_failed is None and upload:
            self._capture(bufs)
        if bufs.graph is not None and upload:
            e[0].record(s)
            bufs.graph.launch(s.handle)
            e[3].record(s)
            s.synchronize()
            self.last_timings = {"upload+infer+download": e[3].time_since(e[0])}
            return
        e[0].record(s)
        if upload:
            self.cuda.memcpy_htod_async(bufs.dev_in, bufs.host_in, s)
        e[1].record(s)
        if not self._context.execute_async_v3(s.handle):
            raise BackendError("TensorRT execute_async_v3 failed: " + " | ".join(self._logger.errors[-3:]))
        e[2].record(s)
        self.cuda.memcpy_dtoh_async(bufs.host_out, bufs.dev_out, s)
        e[3].record(s)
        s.synchronize()
        t = {"infer": e[2].time_since(e[1]), "download": e[3].time_since(e[2])}
        if upload:
            t = {"upload": e[1].time_since(e[0]), **t}
        self.last_timings = t

    def _capture(self, bufs: _Buffers) -> None:
        """Run once normally (TensorRT finishes shape-dependent setup), then capture copy-in,
        inference and copy-out on our stream; later frames replay the graph."""
        self._stream.synchronize()
        self.cuda.memcpy_htod_async(bufs.dev_in, bufs.host_in, self._stream)
        self._enqueue(bufs, upload=False)
        self._stream.synchronize()
        graph = CudaGraph()
        try:
            graph.capture(self._stream.handle, lambda: self._enqueue(bufs, upload=True))
            bufs.graph = graph
        except Exception as exc:  # fall back to plain execution, once, with the reason kept
            graph.destroy()
            bufs.graph_failed = str(exc)
            self.log(f"CUDA graph capture failed for shape {bufs.shape}, running without it: {exc}")

    # -- GPU pre/post-processing ------------------------------------------------------------

    def infer_frame(self, frame_bgr: np.ndarray) -> np.ndarray:
        """BGR uint8 frame -> engine output, with resize/normalise done by a CUDA kernel that
        writes straight into the engine's input buffer (the frame crosses the bus once)."""
        from ..cuda_preprocess import GpuFrame, GpuPreprocessor
        from ..preprocess import input_size_for, preprocess

        h, w = input_size_for(frame_bgr.shape, self.meta)
        with self._lock, self._active():
            if self._pre is None and self.gpu_preprocess_error is None:
                try:
                    self._gpu_frame, self._pre = GpuFrame(), GpuPreprocessor(self.meta)
                except Exception as exc:  # noqa: BLE001 - typically no nvcc to compile the kernels
                    # The kernels are compiled at first use; without nvcc (a Jetson without
                    # /usr/local/cuda/bin on PATH) the CPU path is as correct, only slower.
                    self._gpu_frame = self._pre = None
                    first_line = (str(exc).strip().splitlines() or [""])[0]
                    self.gpu_preprocess_error = f"{type(exc).__name__}: {first_line}"
                    self.log(f"GPU preprocessing unavailable ({self.gpu_preprocess_error}); preprocessing on the "
                             "CPU instead. Put nvcc on PATH (export PATH=/usr/local/cuda/bin:$PATH) to use it.")
        if self._pre is None:
            t0 = time.perf_counter()
            tensor = preprocess(frame_bgr, self.meta)
            cpu_ms = (time.perf_counter() - t0) * 1e3
            output = self.infer(tensor)
            self.last_timings = {"preprocess": cpu_ms, **self.last_timings}
            return output
        with self._lock, self._active():
            bufs = self._buffers_for((1, 3, h, w))
            e, s = self._events, self._stream
            e[4].record(s)
            self._gpu_frame.upload(np.ascontiguousarray(frame_bgr), s)
            e[5].record(s)
            self._pre.run(self._gpu_frame, int(bufs.dev_in), (h, w), self.input_dtype, s)
            self._run(bufs, upload=False)  # records e[0..3] after the preprocess kernel
            self.last_timings = {"upload": e[5].time_since(e[4]), "preprocess": e[1].time_since(e[5]),
                                 **self.last_timings}
            return bufs.host_out.copy()

    def render_last(self, alpha: float = 0.5, visible: list[int] | None = None,
                    view: str = "overlay") -> tuple[np.ndarray, np.ndarray]:
        """Colour the last infer_frame() labels and blend them over that frame, on the GPU.
        Returns (BGR picture at frame size, uint8 labels at frame size)."""
        from ..cuda_preprocess import GpuRenderer

        if self.gpu_preprocess_error is not None:
            raise BackendError(f"GPU rendering is unavailable: {self.gpu_preprocess_error}")
        if self._gpu_frame is None or self._current_shape is None:
            raise BackendError("render_last() needs a frame from infer_frame() first")
        if self.meta.output_kind != "labels":
            raise BackendError("the GPU renderer needs a labels model (argmax in the graph)")
        with self._lock, self._active():
            if self._render is None:
                self._render = GpuRenderer(self.meta)
            bufs = self._buffers[self._current_shape]
            return self._render.run(int(bufs.dev_out), bufs.out_shape[-2:], self.output_dtype, self._gpu_frame,
                                    self._stream, alpha, visible, view)

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Free buffers and TensorRT objects while the context is current, then release it."""
        if self._ctx is None:
            return
        with self._lock:
            self._ctx.push()
            try:
                if self._stream is not None:
                    self._stream.synchronize()
                for b in self._buffers.values():
                    b.free()
                self._buffers.clear()
                if self._pre is not None or self._render is not None:
                    from ..cuda_preprocess import release_kernels

                    release_kernels()
                for obj in (self._render, self._pre, self._gpu_frame):
                    if obj is not None:
                        obj.free()
                self._render = self._pre = self._gpu_frame = None
                # TensorRT objects go before the context: context, then engine, then runtime.
                self._context = None
                self._engine = None
                self._runtime = None
                self._events = []
                self._stream = None
            finally:
                self.cuda.Context.pop()
                self._ctx.detach()
                self._ctx = None
                self._current_shape = None

    def __enter__(self) -> "TensorRTBackend":
        return self if self._engine is not None else self.load()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close() must not leave the primary context retained
        try:
            self.close()
        except Exception:
            pass
