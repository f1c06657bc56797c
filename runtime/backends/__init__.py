"""Inference backends, shaped like Polygraphy's runners: load, infer, close."""

from .base import Backend, BackendError, open_backend

__all__ = ["Backend", "BackendError", "open_backend"]
