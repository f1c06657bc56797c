"""The one place that picks a backend for an artifact: by suffix (``auto``) or by name.

Built-in backends are named here by module path and imported only when chosen. Backends
from elsewhere register under the ``dilseg.backends`` entry-point group (``NAME =
"package.module:BackendClass"`` in their pyproject.toml): the PyTorch backend for
``.safetensors`` weights does, from the export side next to the model zoo it needs, so the
runtime discovers it without naming it and never imports torch itself.
"""

from __future__ import annotations

import importlib
from dataclasses import fields
from importlib import metadata
from pathlib import Path
from typing import Any

from ..artifact import ENGINE_SUFFIXES, ONNX_SUFFIX, WEIGHTS_SUFFIX, artifact_suffix
from ..triton_url import is_triton_url
from .base import Backend, BackendError, BackendOptions, option_flag

ENTRY_POINT_GROUP = "dilseg.backends"

BUILTIN = {
    "onnxruntime": "dilseg.runtime.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "tensorrt": "dilseg.runtime.trt.runner:TensorRTBackend",
    "triton": "dilseg.runtime.backends.triton_backend:TritonBackend",  # triton:// URLs, not files
    "openvino": "dilseg.runtime.backends.openvino_backend:OpenVINOBackend",
}

# What ``auto`` runs each kind of artifact on. ONNX Runtime's provider list itself prefers its
# TensorRT and CUDA providers where they are installed.
AUTO = {ONNX_SUFFIX: "onnxruntime", **{s: "tensorrt" for s in ENGINE_SUFFIXES}, WEIGHTS_SUFFIX: "pytorch"}

# Backends known by name without loading them, and what is missing when a plugin is absent.
PLUGIN_HINTS = {"pytorch": ("running .safetensors weights needs PyTorch and dilseg's export side: "
                            "pip install 'dilseg[export]', or pass an exported .onnx")}


def _plugins() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def backend_names() -> tuple[str, ...]:
    """Every backend name ``open_backend`` accepts, ``auto`` first."""
    return ("auto", *BUILTIN, *sorted((set(_plugins()) | set(PLUGIN_HINTS)) - set(BUILTIN)))


# What a built-in backend whose class does not yet declare ``requires`` / ``needs_nvidia_gpu``
# needs, so that ``unavailable_reason`` is right for it too: TensorRT's runner (runtime/trt/runner.py).
def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine, or None when it can: its class's
    ``available()``, or why the class itself cannot be had."""
    try:
        cls = backend_class(name)
    except BackendError as exc:
        return str(exc)
    except ImportError as exc:  # a built-in backend's module missing from this install
        return f"this dilseg install cannot import its {name} backend ({exc})"
    return cls.available()


def backend_class(name: str) -> type[Backend]:
    """The class of backend ``name`` (imported now), or a BackendError saying how to get it."""
    if name in BUILTIN:
        module, attr = BUILTIN[name].split(":")
        return getattr(importlib.import_module(module), attr)
    ep = _plugins().get(name)
    if ep is None:
        if name in PLUGIN_HINTS:
            raise BackendError(f"the {name} backend is not installed: {PLUGIN_HINTS[name]}")
        raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(backend_names())}")
    try:
        cls = ep.load()
    except ImportError as exc:
        hint = PLUGIN_HINTS.get(name, f"install what {ep.value} needs")
        raise BackendError(f"the {name} backend cannot be imported ({exc}); {hint}") from None
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendError(f"entry point {name} = {ep.value} is not a dilseg Backend class")
    return cls


def choose(path: Path, backend: str = "auto") -> type[Backend]:
    """The backend class for an artifact: by its suffix for ``auto``, else the one named."""
    suffix = artifact_suffix(path)
    if backend == "auto":
        if suffix not in AUTO:
            raise BackendError(f"{path}: not a model dilseg runs (expected {', '.join(AUTO)}); "
                               "see `dilseg info` and `dilseg export onnx`")
        backend = AUTO[suffix]
    cls = backend_class(backend)
    if suffix not in cls.suffixes:
        raise BackendError(f"{path}: the {cls.label} backend runs {cls.artifacts}, not a {suffix or 'suffix-less'} "
                           f"file" + (f"; run it with --backend {AUTO[suffix]} (or auto)" if suffix in AUTO else ""))
    return cls


def make_options(cls: type[Backend], path: Path, given: dict[str, Any]) -> BackendOptions:
    """``cls.Options`` from keyword options; an option the backend does not have is the same
    clear BackendError on every backend, naming the backend it belongs to where there is one."""
    known = {f.name for f in fields(cls.Options)}
    unknown = [k for k in given if k not in known]
    if unknown:
        flags = ", ".join(option_flag(k) for k in unknown)
        for other in BUILTIN:
            if other == cls.name:
                continue
            try:
                owner = backend_class(other)
            except (ImportError, BackendError):  # a backend whose own dependencies are missing names no owner
                continue
            if all(k in {f.name for f in fields(owner.Options)} for k in unknown):
                raise BackendError(f"{flags}: {owner.label} option(s), but {path.name} runs on {cls.label} here; "
                                   f"{owner.selection_hint}")
        takes = ", ".join(option_flag(f.name) for f in fields(cls.Options)) or "none"
        raise BackendError(f"{flags}: not option(s) of the {cls.label} backend (it takes: {takes})")
    try:
        options = cls.Options(**given)
    except TypeError as exc:
        raise BackendError(f"{cls.label} backend options: {exc}") from None
    options.check(path)
    return options


def open_backend(model: str | Path, backend: str = "auto", options: BackendOptions | None = None,
                 **kwargs: Any) -> Backend:
    """The loaded backend for an artifact (``.onnx``, ``.engine``/``.plan``, ``.safetensors``) or a
    model served by Triton (``triton://HOST:PORT/MODEL``, ``triton+http://...``).

    ``backend``: ``auto`` (by suffix) or a name from ``backend_names()``. Options come either as
    the backend's options dataclass or as keywords (``threads=2``, ``cuda_graph=True``).
    """
    if is_triton_url(model):
        return _open_triton(str(model), backend, options, kwargs)
    if backend == "triton":
        raise BackendError(f"{model}: the Triton backend takes a served model, --model triton://HOST:PORT/MODEL "
                           "(see `dilseg export triton`), not a file")
    path = Path(model)
    if not path.exists():
        raise BackendError(f"{path}: no such model file; pass an .onnx, .engine or .safetensors "
                           "(see `dilseg info`)")
    if path.is_dir():
        raise BackendError(f"{path}: is a folder, not a model file")
    cls = choose(path, backend)
    return cls.open(path, _options(cls, path, options, kwargs)).load()


def _options(cls: type[Backend], path: Path, options: BackendOptions | None, kwargs: dict[str, Any]) -> BackendOptions:
    """The backend's options from an options object or keywords, checked against ``path``."""
    if options is not None and kwargs:
        raise BackendError("pass backend options either as an options object or as keywords, not both")
    if options is None:
        return make_options(cls, path, kwargs)
    if not isinstance(options, cls.Options):
        raise BackendError(f"the {cls.label} backend takes {cls.Options.__name__}, not {type(options).__name__}")
    options.check(path)
    return options


def _open_triton(url: str, backend: str, options: BackendOptions | None, kwargs: dict[str, Any]) -> Backend:
    """A model served by Triton: the URL names it, so there is no file and no suffix to choose by."""
    from ..triton_url import parse_triton_url

    if backend not in ("auto", "triton"):
        raise BackendError(f"{url}: a triton:// URL runs on the Triton backend, not {backend}; drop --backend "
                           "or pass --backend triton")
    target = parse_triton_url(url)
    cls = backend_class("triton")
    return cls.open(target, _options(cls, Path(target.model), options, kwargs)).load()
