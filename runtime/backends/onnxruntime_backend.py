"""ONNX Runtime backend: runs any dilseg ONNX (fp32, fp16, int8 QDQ) on the best provider present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..artifact import read_onnx_meta
from ..metadata import ModelMeta
from .base import BackendError

PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(requested: list[str] | None = None) -> list[str]:
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
    """Intra-op threads: every core on small boxes (2-core VM, 6-core Jetson), at most 8
    elsewhere, where more threads only add synchronisation cost for a model this small."""
    return max(1, min(os.cpu_count() or 1, 8))


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        self.path = Path(path)
        self.requested_providers = providers
        self.threads = threads or default_threads()
        self.session: ort.InferenceSession | None = None
        self.meta: ModelMeta = read_onnx_meta(self.path)

    def load(self) -> "OnnxRuntimeBackend":
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Pipeline threads already overlap the stages; spinning workers would only steal
        # cycles from capture and postprocessing on a 2-core box.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=choose_providers(self.requested_providers))
        except BackendError:
            raise
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise BackendError(f"{self.path}: ONNX Runtime cannot load this model: {exc}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise BackendError(f"{self.path}: expected one NCHW image input, found {[(i.name, i.shape) for i in inputs]}")
        self.input_name = inputs[0].name
        self.input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        return self

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers() if self.session else []

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        if self.session is None:
            raise BackendError("backend is not loaded; call load() first")
        return self.session.run(None, {self.input_name: tensor.astype(self.input_dtype, copy=False)})[0]

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> "OnnxRuntimeBackend":
        return self if self.session else self.load()

    def __exit__(self, *exc) -> None:
        self.close()
