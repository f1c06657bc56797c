"""Inference backends, shaped like Polygraphy's runners: load, infer, close.

``open_backend("model.onnx")`` picks one by the artifact's suffix (``.onnx`` -> ONNX Runtime,
``.engine``/``.plan`` -> TensorRT, ``.safetensors`` -> PyTorch) or by name, checks its typed
options and returns it loaded. A backend declares what it can do beyond ``infer`` in
``capabilities``.
"""

from .base import Backend, BackendError, BackendOptions, Capabilities
from .factory import backend_class, backend_names, choose, open_backend, unavailable_reason

__all__ = ["Backend", "BackendError", "BackendOptions", "Capabilities", "backend_class", "backend_names", "choose",
           "open_backend", "unavailable_reason"]
