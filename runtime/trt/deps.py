"""TensorRT and pycuda, imported on demand with an error that says how to install them, and the
TensorRT logger every build and load reports through."""

from __future__ import annotations

from typing import Any

from ..errors import DilsegError

INSTALL_HINT = ("desktop/server GPU: `pip install 'dilseg[trt]'` (tensorrt + pycuda); Jetson: TensorRT comes with "
                "JetPack (JetPack 6 ships 10.3), install pycuda with pip, and use a venv made with "
                "`--system-site-packages` so JetPack's tensorrt is visible; without a GPU, run the .onnx with "
                "--backend onnxruntime")
PYCUDA_HINT = ("`pip install pycuda` builds it against the CUDA toolkit (nvcc on PATH; on a Jetson it is "
               "/usr/local/cuda/bin, from JetPack)")


def import_tensorrt(error: type[DilsegError], purpose: str = "the TensorRT backend") -> Any:
    """The ``tensorrt`` module, or ``error`` naming what is missing and how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise error(f"TensorRT is not installed for this Python: {purpose} needs the tensorrt Python package "
                    f"({exc}); {INSTALL_HINT}") from None
    return trt


def import_pycuda(error: type[DilsegError], purpose: str = "the TensorRT backend") -> Any:
    """``pycuda.driver``, or ``error`` naming what is missing and how to get it."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise error(f"{purpose} needs pycuda, which is missing ({exc}); {PYCUDA_HINT}; {INSTALL_HINT}") from None
    return cuda


def make_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps errors and warnings, so a failed build or load can say why."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(str(msg))
            elif severity == trt.ILogger.WARNING:
                self.warnings.append(str(msg))

    return _Logger()
