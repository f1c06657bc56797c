"""OpenVINO backend: runs any dilseg ONNX (fp32, fp16, int8 QDQ) with Intel's OpenVINO runtime
on the CPU, with the same pre- and postprocessing as every other backend.

- ``ov_precision``: OpenVINO's inference precision hint (``f32``, ``bf16``, ``f16``); None keeps
  OpenVINO's default for the device (bf16 where the CPU has AMX or AVX-512 BF16, else f32).
  An int8 QDQ graph runs its quantised layers in int8 whatever the hint.
- ``ov_hint``: ``latency`` (one request at a time, every core on it) or ``throughput`` (several
  requests in flight: a batch of frames from several streams runs as parallel requests).
- the compiled model is cached with OpenVINO's ``CACHE_DIR`` in a folder keyed, like the
  TensorRT engine cache, by the ONNX's sha256; a record beside it says, on a recompile, which of
  the OpenVINO version, the device, the precision or the hint changed.
- ArgMax: OpenVINO runs an ONNX ArgMax as a TopK, which is slow on small channel counts (a third
  of an int8 model's time); the label head's TopK is rewritten at load into the same first-index
  maximum from element-wise ops (ReduceMax, Equal, Select), which OpenVINO fuses.

- int8 on x86 CPUs without VNNI: their uint8 x int8 products go through saturating int16 pair
  sums, exact only for weights within -64..64 (7 bits, what dilseg's ``cpu`` int8 exports use).
  An int8 graph with 8-bit weights loads with a warning there (``saturation_warning``): the
  shipped model lost 10 points of mIoU that way; ONNX Runtime computes such graphs exactly.

- frames: ``infer_frame`` takes the BGR uint8 frame; OpenCV resizes it to the model's input
  (the same resize as every backend) and OpenVINO's PrePostProcessor does the rest inside the
  compiled graph (u8 to float, colour order, mean/std, NHWC to NCHW), where it runs on the
  inference threads fused with the first convolution instead of as numpy passes before it. That
  model is compiled (and cached) at the first frame; ``infer`` keeps taking normalised tensors.

``openvino`` is an optional dependency (``pip install 'dilseg[openvino]'``): importing this
module without it fails with a message saying so.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import threading
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from ..artifact import ONNX_SUFFIX, read_onnx_meta
from ..autoselect import Machine, cpu_facts
from ..errors import first_line, os_errors_as
from ..files import atomic_write_bytes, sha256_file
from ..preprocess import input_size_for
from .base import Backend, BackendError, BackendOptions, Capabilities, check_threads

try:
    import openvino as ov
except ImportError:  # the factory turns this into a one-line "install it" message
    ov = None

PRECISIONS = ("f32", "bf16", "f16")
HINTS = ("latency", "throughput")
CACHE_RECORD = "dilseg-openvino-cache.json"
INSTALL_HINT = "pip install 'dilseg[openvino]' (or pip install openvino)"


def require_openvino():
    if ov is None:
        raise BackendError(f"the OpenVINO backend needs the openvino package: {INSTALL_HINT}")
    return ov


@functools.cache
def shared_core() -> "ov.Core":
    """The process's one OpenVINO Core, never released before exit.

    When a Core first uses the CPU, OpenVINO's CPU plugin maps a larger signal stack for the
    calling thread (AMX state does not fit the default one) and unmaps it when that Core is
    released. A Core released on another thread, or two released out of order, leave a thread
    whose signal stack is freed memory, and the next Python signal handler run there kills the
    process with SIGSEGV. One Core for the process never frees it (and OpenVINO advises one
    Core per process anyway); settings go per compile, not on the Core."""
    return require_openvino().Core()


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dilseg" / "openvino"


def cache_folder(onnx_path: Path, onnx_sha256: str, root: str | Path | None = None) -> Path:
    """One folder per ONNX content, as the TensorRT engine cache names engines: a changed ONNX
    never meets the compiled blobs of the old one."""
    return Path(root or user_cache_dir()) / f"{onnx_path.stem}-{onnx_sha256[:12]}"


@dataclass(frozen=True)
class OpenVINOOptions(BackendOptions):
    ov_precision: str | None = None  # f32, bf16, f16; None: OpenVINO's default for the device
    ov_hint: str = "latency"  # latency or throughput
    threads: int | None = None  # inference threads (None: OpenVINO's choice, every core)
    ov_cache: str | Path | None = None  # compiled-model cache root (None: ~/.cache/dilseg/openvino)
    ov_device: str = "CPU"
    log: Callable[[str], None] | None = None  # where the cache message and warnings go (default: stderr)

    def __post_init__(self) -> None:
        if self.ov_precision is not None and self.ov_precision not in PRECISIONS:
            raise BackendError(f"--ov-precision {self.ov_precision}: choose one of {', '.join(PRECISIONS)}")
        if self.ov_hint not in HINTS:
            raise BackendError(f"--ov-hint {self.ov_hint}: choose one of {', '.join(HINTS)}")
        check_threads(self.threads)


def rewrite_argmax(model) -> int:
    """Replace each TopK(k=1) whose values are unused (an ONNX ArgMax) by the first index of the
    maximum computed element-wise; returns how many were replaced. Same result as the TopK:
    the lowest class id among equal maxima, as ONNX's ArgMax defines."""
    import openvino.opset13 as ops

    replaced = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "TopK" or node.get_attributes().get("mode") != "max":
            continue
        k = node.input_value(1).get_node()
        if k.get_type_name() != "Constant" or int(np.asarray(k.get_data()).reshape(-1)[0]) != 1:
            continue
        if node.output(0).get_target_inputs():
            continue  # the values are used: a real TopK, not an ArgMax
        scores = node.input_value(0)
        axis = int(node.get_attributes()["axis"])
        shape = scores.get_partial_shape()
        if shape.rank.is_dynamic or shape[axis].is_dynamic:
            continue
        channels = shape[axis].get_length()
        rank = shape.rank.get_length()
        axes = ops.constant(np.array([axis], np.int64))
        best = ops.reduce_max(scores, axes, keep_dims=True)
        # Channel c scores (channels - c) where it reaches the maximum, 0 elsewhere; the largest
        # such score belongs to the first maximal channel.
        weight_shape = [1] * rank
        weight_shape[axis] = channels
        weights = ops.constant((channels - np.arange(channels, dtype=np.float32)).reshape(weight_shape))
        zero = ops.constant(np.zeros([1] * rank, np.float32))
        picked = ops.select(ops.equal(scores, best), weights, zero)
        top = ops.reduce_max(picked, axes, keep_dims=True)
        index = ops.subtract(ops.constant(np.full([1] * rank, channels, np.float32)), top)
        index = ops.convert(index, node.output(1).get_element_type())
        node.output(1).replace(index.output(0))
        replaced += 1
    if replaced:
        model.validate_nodes_and_infer_types()
    return replaced


def int8_weight_peak(model) -> int | None:
    """The largest |integer| among the quantised weights of an OpenVINO model read from an ONNX;
    None without any. Weights arrive in two forms: int8 constants (a DequantizeLinear of int8
    initialisers) and float constants through a FakeQuantize (a QuantizeLinear/DequantizeLinear
    pair on float weights), whose integer is the weight's step counted from zero's step."""
    peaks = []
    for node in model.get_ordered_ops():
        kind = node.get_type_name()
        if kind == "Constant" and node.get_element_type() == ov.Type.i8:
            data = np.asarray(node.get_data())
            if data.size > 1:  # weights, not a zero point
                peaks.append(int(np.abs(data.astype(np.int16)).max()))
        elif kind == "FakeQuantize" and int(node.get_attributes()["levels"]) in (255, 256):
            parts = [node.input_value(i).get_node() for i in range(3)]
            if any(part.get_type_name() != "Constant" for part in parts):
                continue  # activations
            x, lo, hi = (np.asarray(part.get_data(), np.float64) for part in parts)
            steps = (int(node.get_attributes()["levels"]) - 1) / np.maximum(hi - lo, 1e-30)
            level = np.rint((np.clip(x, lo, hi) - lo) * steps)
            zero = np.rint(-lo * steps)
            peaks.append(int(np.abs(level - zero).max()))
    return max(peaks) if peaks else None


def saturation_warning(weight_peak: int | None, device: str, cpu_flags: frozenset[str]) -> str | None:
    """The warning an int8 graph deserves on this CPU, or None when its products are exact here."""
    x86 = "ssse3" in cpu_flags  # pmaddubsw, the saturating instruction, is SSSE3's
    if weight_peak is None or weight_peak <= 64 or device != "CPU" or not x86 or Machine(cpu_flags=cpu_flags).vnni:
        return None
    return (f"OpenVINO: warning: this int8 graph has 8-bit weights (up to ±{weight_peak}) and this CPU has no "
            "VNNI, so OpenVINO's int8 products saturate here and the labels can be wrong (the shipped model's "
            "8-bit variant lost 10 points of mIoU that way). Quantise with 7-bit weights (`dilseg export "
            "--precision int8 --target cpu` does, as does ONNX Runtime's quantize_static(reduce_range=True)) "
            "or run this file with --backend onnxruntime, which computes it exactly")


class OpenVINOBackend(Backend):
    name = "openvino"
    label = "OpenVINO"
    suffixes = (ONNX_SUFFIX,)
    artifacts = ".onnx models"
    selection_hint = "add --backend openvino and pass an .onnx"
    Options = OpenVINOOptions
    capabilities = Capabilities(frame_input=True, frame_batches=True, stage_timings=True)
    requires = (("openvino", INSTALL_HINT),)
    # Infer requests are lent from a pool per call, so several threads may call infer at once
    # (capabilities.concurrent_infer, the default): each runs on requests of its own.

    def __init__(self, path: str | Path, options: OpenVINOOptions | None = None, **keywords) -> None:
        super().__init__(path, options, **keywords)
        self.compiled = None
        self.requests: list = []
        self._idle: queue.SimpleQueue = queue.SimpleQueue()  # requests no call holds now
        self._frame_compiled = None
        self._frame_idle: queue.SimpleQueue = queue.SimpleQueue()
        self._frame_lock = threading.Lock()
        self._frame_made = 0  # frame-input requests made for batches
        self.cache_message = ""
        self.argmax_rewritten = 0
        self.saturation_warning: str | None = None

    # -- load -----------------------------------------------------------------------------

    def cache_key(self, core, sha: str) -> dict:
        device = self.options.ov_device
        try:
            device_name = str(core.get_property(device, "FULL_DEVICE_NAME"))
        except Exception:  # a device OpenVINO does not know is refused at compile time
            device_name = device
        return {"onnx_sha256": sha, "openvino_version": ov.get_version(), "device": device,
                "device_name": device_name, "precision": self.options.ov_precision or "default",
                "hint": self.options.ov_hint}

    def load_impl(self) -> None:
        require_openvino()
        self.require_file()
        self.meta = read_onnx_meta(self.path)
        core = shared_core()
        if self.options.ov_device not in core.available_devices:
            raise BackendError(f"--ov-device {self.options.ov_device}: not available here "
                               f"(OpenVINO sees: {', '.join(core.available_devices)})")
        sha = sha256_file(self.path)
        folder = cache_folder(self.path, sha, self.options.ov_cache)
        key = self.cache_key(core, sha)
        with os_errors_as(BackendError, folder, "create the OpenVINO cache folder (pass --ov-cache DIR)"):
            folder.mkdir(parents=True, exist_ok=True)
        config = {"PERFORMANCE_HINT": self.options.ov_hint.upper(), "CACHE_DIR": str(folder)}
        if self.options.ov_precision:
            config["INFERENCE_PRECISION_HINT"] = self.options.ov_precision
        if self.options.threads:
            config["INFERENCE_NUM_THREADS"] = self.options.threads
        self._core, self._config = core, config
        t0 = time.perf_counter()
        try:
            model = core.read_model(str(self.path))
            weight_peak = int8_weight_peak(model)
            self.argmax_rewritten = rewrite_argmax(model)
            self.compiled = core.compile_model(model, self.options.ov_device, config)
        except Exception as exc:  # OpenVINO raises RuntimeError with multi-line C++ context
            raise BackendError(f"{self.path}: OpenVINO cannot compile this model: {first_line(exc)}") from None
        seconds = time.perf_counter() - t0
        self.cache_message = self._note_cache(folder, key, seconds)
        log = self.options.log or (lambda text: print(text, file=sys.stderr))
        log(self.cache_message)
        self.saturation_warning = saturation_warning(weight_peak, self.options.ov_device, cpu_facts()[1])
        if self.saturation_warning:
            log(self.saturation_warning)
        wanted = self.options.ov_precision
        if wanted and self.precision != wanted:
            # OpenVINO quietly runs f32 where the CPU lacks the asked precision; say so.
            try:
                caps = ", ".join(core.get_property(self.options.ov_device, "OPTIMIZATION_CAPABILITIES"))
            except Exception:  # noqa: BLE001 - a device that cannot list them
                caps = "not listed"
            log(f"OpenVINO: {self.options.ov_device} cannot run {wanted} here (its capabilities: {caps}); "
                f"it runs {self.precision}")
        inputs = self.compiled.inputs
        if len(inputs) != 1 or inputs[0].get_partial_shape().rank.get_length() != 4:
            raise BackendError(f"{self.path}: expected one NCHW image input, found {len(inputs)} input(s)")
        count = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.requests = [self.compiled.create_infer_request()
                         for _ in range(count if self.options.ov_hint == "throughput" else 1)]
        for request in self.requests:
            self._idle.put(request)
        self.input_dtype = np.float16 if inputs[0].get_element_type() == ov.Type.f16 else np.float32

    def _note_cache(self, folder: Path, key: dict, seconds: float) -> str:
        """What happened to the compiled-model cache, and why when it was a recompile."""
        record_path = folder / CACHE_RECORD
        if bool(self.compiled.get_property("LOADED_FROM_CACHE")):
            return f"OpenVINO: reusing the compiled model cached in {folder} ({seconds:.2f} s)"
        try:
            old = json.loads(record_path.read_text())
        except (OSError, ValueError):
            old = None
        if old is None:
            reasons = ["no cached compiled model yet"]
        else:
            reasons = [f"the {k.replace('_', ' ')} changed ({old.get(k)} -> {v})"
                       for k, v in key.items() if k != "device_name" and old.get(k) != v] or ["not in the cache"]
        try:
            atomic_write_bytes(record_path, (json.dumps(key, indent=2, sort_keys=True) + "\n").encode())
        except OSError:
            pass  # a read-only cache still compiles; it just cannot remember
        return f"OpenVINO: compiled in {seconds:.2f} s, cached in {folder}: {'; '.join(reasons)}"

    # -- facts ----------------------------------------------------------------------------

    @property
    def precision(self) -> str:
        """The precision OpenVINO runs the model's float layers in (its resolved hint)."""
        if self.compiled is None:
            return self.options.ov_precision or "default"
        return self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()

    def batch_range(self) -> tuple[int, int | None]:
        shape = self.compiled.inputs[0].get_partial_shape() if self.compiled is not None else None
        if shape is not None and shape[0].is_dynamic:
            return (1, None)
        # A fixed batch-1 graph still takes a batch: its frames run as parallel requests.
        return (1, len(self.requests) or 1)

    def parallel_batches(self) -> bool:
        # A graph fixed at one frame runs a batch as one request per frame (throughput hint:
        # several requests); a free batch axis runs it as one request.
        return self.batch_range()[1] not in (None, 1)

    # -- infer ----------------------------------------------------------------------------

    @staticmethod
    def _run_parallel(get, give_back, inputs: list[np.ndarray]) -> np.ndarray:
        """Each input on a request of its own from ``get()``, started as soon as it has one and
        handed back (``give_back``) as soon as its frame has been collected, in order, so the
        batches of two callers (--instances) interleave on the requests. No completion
        callbacks: a callback needs the GIL on OpenVINO's thread, which a busy pipeline's other
        threads hold often enough to delay every frame; a lone input runs synchronously."""
        if len(inputs) == 1:
            request = get()
            try:
                request.infer({0: inputs[0]})
                return request.get_output_tensor(0).data.copy()
            except Exception as exc:  # a bad shape or dtype: refused before it runs
                raise BackendError(f"OpenVINO cannot run this input {list(inputs[0].shape)} {inputs[0].dtype}: "
                                   f"{first_line(exc)}") from None
            finally:
                give_back(request)
        started: list = []
        outputs: list[np.ndarray] = []
        try:
            for x in inputs:
                request = get()
                try:
                    request.start_async({0: x})
                except Exception as exc:
                    give_back(request)
                    raise BackendError(f"OpenVINO cannot run this input {list(x.shape)} {x.dtype}: "
                                       f"{first_line(exc)}") from None
                started.append(request)
            while started:
                request = started[0]
                request.wait()
                outputs.append(request.get_output_tensor(0).data.copy())
                give_back(started.pop(0))
        finally:
            for request in started:  # after an error: let those running finish, then hand them back
                try:
                    request.wait()
                except Exception:  # noqa: BLE001 - the first error is the one reported
                    pass
                give_back(request)
        return np.concatenate(outputs)

    def infer_impl(self, tensor: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(tensor, dtype=self.input_dtype)
        fixed = not self.compiled.inputs[0].get_partial_shape()[0].is_dynamic
        if x.shape[0] > 1 and fixed and x.shape[0] > len(self.requests):
            raise BackendError(f"batch of {x.shape[0]} frames, but this OpenVINO model takes at most "
                               f"{len(self.requests)} at once (--ov-hint throughput runs more)")
        t0 = time.perf_counter()
        # A fixed graph's batch runs as parallel requests, one per frame; a free batch axis
        # takes the whole batch in one request.
        out = self._run_parallel(self._idle.get, self._idle.put, [item[None] for item in x] if x.shape[0] > 1 and fixed
                                 else [x])
        t1 = time.perf_counter()
        self.last_timings = {"ov_infer": (t1 - t0) * 1e3, "ov_output": (time.perf_counter() - t1) * 1e3}
        return out

    def _frame_model_request(self):
        """An idle infer request of the model with the normalisation folded in (input BGR uint8
        N x H x W x 3 at the model's size, output as the plain model's): one more is made when
        every one is in use by another thread. Give it back with ``_frame_idle.put``."""
        with self._frame_lock:
            if self._frame_compiled is None:
                self._frame_compiled = self._compile_frame_model()
        try:
            return self._frame_idle.get_nowait()
        except queue.Empty:
            return self._frame_compiled.create_infer_request()

    def _frame_parallel_request(self):
        """An idle frame-input request for a batch: as many exist as the plain model has
        requests (one per CPU stream under the throughput hint); beyond, it waits for one."""
        with self._frame_lock:
            if self._frame_compiled is None:
                self._frame_compiled = self._compile_frame_model()
            if self._frame_made < len(self.requests):
                self._frame_made += 1
                return self._frame_compiled.create_infer_request()
        return self._frame_idle.get()

    def _compile_frame_model(self):
        meta, core = self.meta, self._core
        try:
            model = core.read_model(str(self.path))
            rewrite_argmax(model)
            ppp = ov.preprocess.PrePostProcessor(model)
            info = ppp.input(0)
            info.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_color_format(
                ov.preprocess.ColorFormat.BGR)
            info.model().set_layout(ov.Layout("NCHW"))
            steps = info.preprocess().convert_element_type(ov.Type.f32)
            if meta.color_order == "RGB":
                steps.convert_color(ov.preprocess.ColorFormat.RGB)
            # (x/255 - mean)/std, per channel of the model's colour order, as preprocess.normalize.
            steps.mean([255.0 * m for m in meta.mean]).scale([255.0 * d for d in meta.std])
            if model.inputs[0].get_element_type() != ov.Type.f32:
                steps.convert_element_type(model.inputs[0].get_element_type())
            compiled = core.compile_model(ppp.build(), self.options.ov_device, self._config)
        except Exception as exc:  # OpenVINO raises RuntimeError with multi-line C++ context
            raise BackendError(f"{self.path}: OpenVINO cannot compile the frame-input model: {first_line(exc)}") from None
        return compiled

    def infer_frame(self, frame_bgr: np.ndarray) -> np.ndarray:
        """BGR uint8 frame -> model output: resized here as ``preprocess`` resizes, normalised
        inside the compiled graph."""
        self.require_loaded()
        if frame_bgr.dtype != np.uint8 or frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3:
            raise BackendError(f"expected a BGR uint8 HxWx3 frame, got {frame_bgr.dtype} {frame_bgr.shape}")
        request = self._frame_model_request()
        t0 = time.perf_counter()
        h, w = input_size_for(frame_bgr.shape, self.meta)
        if frame_bgr.shape[:2] != (h, w):
            frame_bgr = cv2.resize(frame_bgr, (w, h), interpolation=cv2.INTER_LINEAR)
        t1 = time.perf_counter()
        out = self._run_parallel(lambda: request, self._frame_idle.put, [np.ascontiguousarray(frame_bgr)[None]])
        t2 = time.perf_counter()
        self.last_timings = {"host_preprocess": (t1 - t0) * 1e3, "ov_infer": (t2 - t1) * 1e3,
                             "ov_output": (time.perf_counter() - t2) * 1e3}
        self.counts.add(1)
        return out

    def infer_frames(self, frames: list[np.ndarray]) -> np.ndarray:
        """BGR uint8 frames of one size -> the model's outputs, stacked: each frame resized as
        ``infer_frame`` resizes it, the frames run at once as parallel requests of the
        frame-input model (under the throughput hint, one per CPU stream)."""
        self.require_loaded()
        for frame in frames:
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise BackendError(f"expected BGR uint8 HxWx3 frames, got {frame.dtype} {frame.shape}")
        t0 = time.perf_counter()
        h, w = input_size_for(frames[0].shape, self.meta)
        inputs = [np.ascontiguousarray(f if f.shape[:2] == (h, w) else
                                       cv2.resize(f, (w, h), interpolation=cv2.INTER_LINEAR))[None] for f in frames]
        t1 = time.perf_counter()
        out = self._run_parallel(self._frame_parallel_request, self._frame_idle.put, inputs)
        t2 = time.perf_counter()
        self.last_timings = {"host_preprocess": (t1 - t0) * 1e3, "ov_infer": (t2 - t1) * 1e3, "ov_output": 0.0}
        self.counts.add(len(frames))
        return out

    def close_impl(self) -> None:
        self.requests = []
        self._idle, self._frame_idle = queue.SimpleQueue(), queue.SimpleQueue()
        self._frame_compiled, self._frame_made = None, 0
        self.compiled = None
