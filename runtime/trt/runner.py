"""TensorRT runner: runs the engine a loader hands it (``loaders.py``) through pycuda.

The device's primary context is retained at load() and pushed/popped around every call, in
whichever thread makes it, so load() may run in one thread and infer() in another. Buffers
(page-locked host + device) are allocated once per input shape; copies and
``execute_async_v3`` run on the runner's own stream; only the label map comes back.
close() frees the buffers, the kernels and then the TensorRT objects while the context is
current, then releases the context (``PrimaryContext.release``, from whichever thread closes).

``cuda_graph``: inference and copy-out become one CUDA graph per input shape, replayed by
infer() and infer_frame() alike (copy-in, or the preprocessing kernel, is queued before it).

Timings: ``last_timings`` holds CUDA-event times of the last call under ``gpu_*`` names
(``gpu_upload``, ``gpu_preprocess``, ``gpu_infer``, ``gpu_download``; ``gpu_infer+download``
for a graph replay); the "infer" stage the Segmenter reports is the wall time of the call, as on
every backend.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..artifact import ENGINE_SUFFIXES, ONNX_SUFFIX, is_engine
from ..backends.base import Backend, BackendError, BackendOptions, Capabilities, option_flag
from .build import LABEL_DTYPES, BuildOptions
from .cache import EngineError
from .compat import detect
from .cuda import CudaGraph, PrimaryContext, find_gpu
from .deps import INSTALL_HINT, PYCUDA_HINT, import_pycuda, import_tensorrt, make_logger
from .loaders import EngineFromFile, EngineFromOnnx, LoadedEngine

MAX_SHAPES = 4  # buffer sets kept for a dynamic engine (one per input shape seen recently)

@dataclass(frozen=True)
class TensorRTOptions(BuildOptions, BackendOptions):
    """The runner's own options, plus the build options (as `dilseg build`'s) that apply when an
    .onnx is run: how its engine is built and cached."""

    cuda_graph: bool = False  # capture inference and copy-out once per input shape and replay it
    engine: str | Path | None = None  # where to cache the engine of an .onnx (default: beside it)
    rebuild: bool = False  # build even when the cached engine matches
    log: Callable[[str], None] | None = None  # where messages go (default: stderr)

    def __post_init__(self) -> None:
        if not isinstance(self.device, int) or self.device < 0:
            raise BackendError(f"--device {self.device}: must be a CUDA device index (0, 1, ...)")
        if self.dla_core is not None and (not isinstance(self.dla_core, int) or self.dla_core < 0):
            raise BackendError(f"--dla-core {self.dla_core}: must be 0 or more")

    def check(self, path: Path) -> None:
        if is_engine(path):
            # Everything but the device and the progress bars only shapes a build.
            build_only = [f.name for f in fields(BuildOptions) if f.name not in ("device", "progress")]
            given = [k for k in (*build_only, "engine", "rebuild") if k in self.given()]
            if given:
                flags = ", ".join(option_flag(k) for k in given)
                raise BackendError(f"{flags}: build option(s), but {path.name} is built already (`dilseg info` shows "
                                   "how); pass the .onnx to build with them, or use `dilseg build`")

    def build_options(self) -> BuildOptions:
        return BuildOptions(**{f.name: getattr(self, f.name) for f in fields(BuildOptions)})


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
    replays: int = 0  # calls the graph served

    def free(self) -> None:
        if self.graph is not None:
            self.graph.destroy()
        for d in (self.dev_in, self.dev_out):
            d.free()
        for h in (self.host_in, self.host_out):
            if getattr(h, "base", None) is not None:
                h.base.free()


def graph_step(enabled: bool, captured: bool, failed: bool) -> str:
    """What one call does with its input shape's CUDA graph: "capture" (run plainly, then
    capture), "replay" or "plain". The same on infer's and infer_frame's paths: copy-in or the
    preprocessing kernel is queued before it either way."""
    if not enabled or failed:
        return "plain"
    return "replay" if captured else "capture"


Loader = Callable[[Any, Any], LoadedEngine]


class TensorRTBackend(Backend):
    """``TensorRTBackend(EngineFromFile("m.engine"))`` or ``TensorRTBackend(EngineFromOnnx("m.onnx"))``;
    a path picks the loader by its suffix (what ``open_backend`` does)."""

    name = "tensorrt"
    label = "TensorRT"
    suffixes = (*ENGINE_SUFFIXES, ONNX_SUFFIX)
    artifacts = "a .engine/.plan from `dilseg build`, or an .onnx (built into an engine once and cached)"
    selection_hint = "add --backend tensorrt (dilseg then builds and caches an engine) or pass an .engine"
    Options = TensorRTOptions
    capabilities = Capabilities(frame_input=True, gpu_render=True, stage_timings=True, cuda_graph=True)
    requires = (("tensorrt", INSTALL_HINT), ("pycuda", PYCUDA_HINT))
    needs_nvidia_gpu = True

    def __init__(self, loader: Loader | str | Path, options: TensorRTOptions | None = None) -> None:
        options = options if options is not None else TensorRTOptions()
        if isinstance(loader, (str, Path)):
            loader = self.loader_for(Path(loader), options)
        super().__init__(getattr(loader, "onnx_path", None) or getattr(loader, "path", ""), options)
        self.loader = loader
        self.log = options.log or (lambda msg: print(msg, file=sys.stderr))
        # Fail early and clearly on a machine without TensorRT or pycuda.
        self.trt = import_tensorrt(BackendError)
        self.cuda = import_pycuda(BackendError)
        self.engine_path: Path | None = None
        self.sidecar: dict | None = None
        self._ctx: PrimaryContext | None = None
        self._lock = threading.Lock()
        self._runtime = self._engine = self._context = self._stream = self._logger = None
        self._events: list = []
        self._buffers: dict[tuple, _Buffers] = {}
        self._current_shape = None
        self._gpu_frame = self._pre = self._render = None
        self.gpu_preprocess_error: str | None = None  # why the CUDA kernels could not be used
        self._use_graph = options.cuda_graph

    @staticmethod
    def loader_for(path: Path, options: TensorRTOptions) -> Loader:
        if is_engine(path):
            return EngineFromFile(path)
        return EngineFromOnnx(path, options.build_options(), engine_path=options.engine, rebuild=options.rebuild,
                              log=options.log)

    @classmethod
    def open(cls, path: Path, options: TensorRTOptions) -> "TensorRTBackend":
        return cls(cls.loader_for(path, options), options)

    @property
    def decision(self):
        """What the engine cache did for an .onnx (reuse or build, and why); None for an engine."""
        return getattr(self.loader, "decision", None)

    # -- load ------------------------------------------------------------------------------

    def load_impl(self) -> None:
        gpu = find_gpu(self.cuda, self.options.device, BackendError)
        self._ctx = PrimaryContext(self.cuda, gpu.index)
        with self._ctx.active():
            self.trt_caps = detect(self.trt)
            loaded = self.loader(self.trt, gpu)
            self._open_engine(loaded)

    def _open_engine(self, loaded: LoadedEngine) -> None:
        trt, side = self.trt, loaded.sidecar
        self.engine_path, self.sidecar, self.meta = loaded.path, side, loaded.meta
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        if side.get("version_compatible") and self.trt_caps.engine_host_code_allowed:
            # A version-compatible engine carries its own lean runtime: host code TensorRT must be allowed to run.
            self._runtime.engine_host_code_allowed = True
        if side.get("dla_core") is not None:
            self._runtime.DLA_core = int(side["dla_core"])
        self._engine = self._runtime.deserialize_cuda_engine(loaded.data)
        if self._engine is None:
            raise EngineError(f"{loaded.path}: TensorRT {self.trt_caps.version} could not deserialize it: "
                              + (" | ".join(self._logger.errors[-3:]) or "no reason given")
                              + "; rebuild it on this machine with `dilseg build`")
        self._check_io()
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"{loaded.path}: could not create an execution context (out of GPU memory?): "
                              + " | ".join(self._logger.errors[-3:]))
        self._stream = self.cuda.Stream()
        self._events = [self.cuda.Event() for _ in range(6)]

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
        if self.meta.output_kind == "labels" and self.output_dtype.name not in LABEL_DTYPES:
            raise EngineError(f"{self.engine_path}: its output {self.output_name!r} is {self.output_dtype}, not "
                              f"{'/'.join(LABEL_DTYPES)} labels as the metadata says; rebuild it from a current "
                              "`dilseg export onnx`")
        shape = tuple(int(d) for d in e.get_tensor_shape(self.input_name))
        self.dynamic = any(d < 0 for d in shape)
        self.profile = tuple(tuple(int(d) for d in s) for s in e.get_tensor_profile_shape(self.input_name, 0)) \
            if self.dynamic else (shape, shape, shape)

    def batch_range(self) -> tuple[int, int | None]:
        """The batch axis of the engine's shape profile (`dilseg build --min/--max`)."""
        self.require_loaded()
        lo, _, hi = self.profile
        return (lo[0], hi[0])

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

    def _enqueue(self, bufs: _Buffers, between=None) -> None:
        """Inference and copy-out on our stream (``between``: an event recorded between them)."""
        s = self._stream
        if not self._context.execute_async_v3(s.handle):
            raise BackendError("TensorRT execute_async_v3 failed: " + " | ".join(self._logger.errors[-3:]))
        if between is not None:
            between.record(s)
        self.cuda.memcpy_dtoh_async(bufs.host_out, bufs.dev_out, s)

    def infer_impl(self, tensor: np.ndarray) -> np.ndarray:
        """NCHW float32 tensor -> the engine's output (int32/uint8 labels NxHxW, or logits)."""
        if tensor.ndim != 4:
            raise BackendError(f"expected an NCHW tensor, got shape {tensor.shape}")
        with self._lock, self._ctx.active():
            bufs = self._buffers_for(tuple(int(d) for d in tensor.shape))
            np.copyto(bufs.host_in, tensor, casting="same_kind" if self.input_dtype == tensor.dtype else "unsafe")
            self._run(bufs, upload=True)
            return bufs.host_out.copy()

    def set_cuda_graph(self, on: bool) -> None:
        """Replay CUDA graphs (or not) from the next call on; graphs already captured are kept."""
        with self._lock:
            self._use_graph = bool(on)

    def _run(self, bufs: _Buffers, upload: bool) -> None:
        """Copy-in (``upload``: infer's host tensor; on infer_frame's path the preprocessing kernel
        has already written the input), inference and copy-out, then wait. With CUDA graphs on,
        inference and copy-out are one graph per input shape, captured at the shape's first call
        and replayed after, on both paths."""
        e, s = self._events, self._stream
        e[0].record(s)
        if upload:
            self.cuda.memcpy_htod_async(bufs.dev_in, bufs.host_in, s)
        e[1].record(s)
        step = graph_step(self._use_graph, bufs.graph is not None, bufs.graph_failed is not None)
        if step == "replay":
            bufs.graph.launch(s.handle)
            bufs.replays += 1
            e[3].record(s)
            s.synchronize()
            t = {"gpu_infer+download": e[3].time_since(e[1])}
        else:
            self._enqueue(bufs, between=e[2])
            e[3].record(s)
            s.synchronize()
            t = {"gpu_infer": e[2].time_since(e[1]), "gpu_download": e[3].time_since(e[2])}
            if step == "capture":
                self._capture(bufs)
        self.last_timings = {"gpu_upload": e[1].time_since(e[0]), **t} if upload else t

    def _capture(self, bufs: _Buffers) -> None:
        """Capture inference and copy-out on our (idle) stream, after a plain run of the same
        shape (TensorRT finishes its shape-dependent setup in the first execute_async_v3); the
        shape's later calls replay it."""
        graph = CudaGraph(BackendError)
        try:
            graph.capture(self._stream.handle, lambda: self._enqueue(bufs))
            bufs.graph = graph
        except Exception as exc:  # fall back to plain execution, once, with the reason kept
            graph.destroy()
            bufs.graph_failed = str(exc)
            self.log(f"CUDA graph capture failed for shape {bufs.shape}, running without it: {exc}")

    # -- GPU pre/post-processing ------------------------------------------------------------

    def infer_frame(self, frame_bgr: np.ndarray) -> np.ndarray:
        """BGR uint8 frame -> engine output, with resize/normalise done by a CUDA kernel that
        writes straight into the engine's input buffer (the frame crosses the bus once)."""
        from ..preprocess import input_size_for, preprocess
        from .kernels import GpuFrame, GpuPreprocessor

        self.require_loaded()
        h, w = input_size_for(frame_bgr.shape, self.meta)
        with self._lock, self._ctx.active():
            if self._pre is None and self.gpu_preprocess_error is None:
                try:
                    self._gpu_frame, self._pre = GpuFrame(), GpuPreprocessor(self.meta)
                except Exception as exc:  # noqa: BLE001 - typically no nvcc to compile the kernels
                    # The kernels are compiled at first use; without nvcc (a Jetson without
                    # /usr/local/cuda/bin on PATH) the CPU path is as correct, only slower.
                    self._gpu_frame = self._pre = None
                    first_line = (str(exc).strip().splitlines() or [""])[0]
                    self.gpu_preprocess_error = f"{type(exc).__name__}: {first_line}"
                    self.capabilities = replace(self.capabilities, gpu_render=False)
                    self.log(f"GPU preprocessing unavailable ({self.gpu_preprocess_error}); preprocessing on the "
                             "CPU instead. Put nvcc on PATH (export PATH=/usr/local/cuda/bin:$PATH) to use it.")
        if self._pre is None:
            t0 = time.perf_counter()
            tensor = preprocess(frame_bgr, self.meta)
            cpu_ms = (time.perf_counter() - t0) * 1e3
            output = self.infer(tensor)
            self.last_timings = {"host_preprocess": cpu_ms, **self.last_timings}
            return output
        with self._lock, self._ctx.active():
            bufs = self._buffers_for((1, 3, h, w))
            e, s = self._events, self._stream
            e[4].record(s)
            self._gpu_frame.upload(np.ascontiguousarray(frame_bgr), s)
            e[5].record(s)
            self._pre.run(self._gpu_frame, int(bufs.dev_in), (h, w), self.input_dtype, s)
            self._run(bufs, upload=False)  # records e[0..3] after the preprocess kernel
            self.last_timings = {"gpu_upload": e[5].time_since(e[4]), "gpu_preprocess": e[1].time_since(e[5]),
                                 **self.last_timings}
            return bufs.host_out.copy()

    def render_last(self, alpha: float = 0.5, visible: list[int] | None = None,
                    view: str = "overlay") -> tuple[np.ndarray, np.ndarray]:
        """Colour the last infer_frame() labels and blend them over that frame, on the GPU.
        Returns (BGR picture at frame size, uint8 labels at frame size)."""
        from .kernels import GpuRenderer

        self.require_loaded()
        if self.gpu_preprocess_error is not None:
            raise BackendError(f"GPU rendering is unavailable: {self.gpu_preprocess_error}")
        if self._gpu_frame is None or self._current_shape is None:
            raise BackendError("render_last() needs a frame from infer_frame() first")
        if self.meta.output_kind != "labels":
            raise BackendError("the GPU renderer needs a labels model (argmax in the graph)")
        with self._lock, self._ctx.active():
            if self._render is None:
                self._render = GpuRenderer(self.meta)
            bufs = self._buffers[self._current_shape]
            return self._render.run(int(bufs.dev_out), bufs.out_shape[-2:], self.output_dtype, self._gpu_frame,
                                    self._stream, alpha, visible, view)

    # -- teardown ----------------------------------------------------------------------------

    def close_impl(self) -> None:
        """Free buffers, kernels and TensorRT objects while the context is current, then release it
        (from whichever thread closes: ``PrimaryContext.release``)."""
        with self._lock:  # also keeps a close() in one thread from freeing what an infer() in another uses
            if self._ctx is None:
                return
            try:
                with self._ctx.active():
                    if self._stream is not None:
                        self._stream.synchronize()
                    for b in self._buffers.values():
                        b.free()
                    self._buffers.clear()
                    if self._pre is not None or self._render is not None:
                        from .kernels import release_kernels

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
                ctx, self._ctx = self._ctx, None
                self._current_shape = None
                ctx.release()

    def __del__(self) -> None:  # a forgotten close() must not leave the primary context retained
        try:
            self.close()
        except Exception:
            pass
