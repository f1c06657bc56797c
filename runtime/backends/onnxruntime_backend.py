"""ONNX Runtime backend: runs any dilseg ONNX (fp32, fp16, int8 QDQ) on the best provider present."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from ..artifact import ONNX_SUFFIX, session_meta
from ..errors import first_line
from ..ort_options import open_session
from .base import Backend, BackendError, BackendOptions, check_threads

PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(requested: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """Providers to ask for: ``requested`` (aliases allowed) or the best available ones.

    An unavailable requested provider is an error, not a silent fall-back to the CPU.
    """
    available = ort.get_available_providers()
    if not requested:
        return [p for p in PREFERENCE if p in available]
    chosen = []
    for name in requested:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            raise BackendError(
                f"ONNX Runtime provider {name!r} is not available here (available: {', '.join(available)}); "
                "install onnxruntime-gpu for CUDA/TensorRT providers"
            )
        chosen.append(full)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def default_threads() -> int:
    """Intra-op threads: every core on small boxes (a Jetson has 6 to 12), at most 8 elsewhere,
    where more threads only add synchronisation cost for models this small."""
    return max(1, min(os.cpu_count() or 1, 8))


@dataclass(frozen=True)
class OnnxRuntimeOptions(BackendOptions):
    threads: int | None = None  # intra-op threads (None: default_threads())
    providers: tuple[str, ...] | None = None  # provider names or aliases (cpu, cuda, tensorrt); None: the best present

    def __post_init__(self) -> None:
        check_threads(self.threads)
        if self.providers is not None:
            object.__setattr__(self, "providers", tuple(self.providers))


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    label = "ONNX Runtime"
    suffixes = (ONNX_SUFFIX,)
    artifacts = ".onnx models"
    selection_hint = "add --backend onnxruntime and pass an .onnx"
    Options = OnnxRuntimeOptions
    session: ort.InferenceSession | None = None

    @property
    def threads(self) -> int:
        return self.options.threads or default_threads()

    def configure(self, so: ort.SessionOptions) -> None:
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The pipeline's threads already overlap the stages; spinning workers would only steal
        # cycles from capture and postprocessing where cores are few.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")

    def load_impl(self) -> None:
        providers = choose_providers(self.options.providers)
        self.require_file()
        try:
            self.session = open_session(str(self.path), providers, self.configure)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise BackendError(f"{self.path}: ONNX Runtime cannot load this model: {first_line(exc)}") from None
        self.meta = session_meta(self.path, self.session)  # one session: metadata and inference
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise BackendError(f"{self.path}: expected one NCHW image input, found {[(i.name, i.shape) for i in inputs]}")
        self.input_name = inputs[0].name
        self.input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32

    def batch_range(self) -> tuple[int, int | None]:
        """Any batch when the graph's first axis is free, else exactly the batch it is fixed at."""
        self.require_loaded()
        batch = self.session.get_inputs()[0].shape[0]
        return (batch, batch) if isinstance(batch, int) and batch > 0 else (1, None)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers() if self.session else []

    def infer_impl(self, tensor: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: tensor.astype(self.input_dtype, copy=False)})[0]

    def close_impl(self) -> None:
        self.session = None
