"""The backend protocol every runtime backend follows, and the one place that picks one."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..metadata import ModelMeta


class BackendError(RuntimeError):
    """A backend cannot load or run an artifact; the message says what to do."""


@runtime_checkable
class Backend(Protocol):
    """load() once, infer() per frame, close() at the end (or use as a context manager).

    ``infer`` takes the preprocessed NCHW float32 tensor and returns what the model
    returns: int32 labels (N, H, W) or float logits (N, C, H, W); ``meta.output_kind``
    says which.
    """

    name: str
    meta: ModelMeta

    def load(self) -> "Backend": ...

    def infer(self, tensor: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


BACKENDS = ("auto", "onnxruntime", "tensorrt")


def open_backend(model: str | Path, backend: str = "auto", **options) -> Backend:
    """Create and load the backend for an artifact.

    ``auto``: a ``.engine`` goes to TensorRT; an ``.onnx`` goes to ONNX Runtime, whose
    provider list itself prefers TensorRT and CUDA execution providers when present.
    """
    path = Path(model)
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if not path.exists():
        raise BackendError(f"{path}: no such model file; pass an .onnx or .engine path (see `dilseg info`)")
    if backend == "auto":
        backend = "tensorrt" if path.suffix == ".engine" else "onnxruntime"
    if backend == "tensorrt":
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend(path, **options).load()
    if path.suffix == ".engine":
        raise BackendError(f"{path}: a TensorRT engine runs only with --backend tensorrt (or auto)")
    from .onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(path, **options).load()
