"""Which model and backend the page runs: availability checks, uploads, loading with readable errors."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from dilseg.runtime.artifact import read_meta
from dilseg.runtime.backends import open_backend, unavailable_reason
from dilseg.runtime.defaults import default_model_path
from dilseg.runtime.errors import DilsegError
from dilseg.runtime.files import atomic_write_bytes
from dilseg.runtime.metadata import MetadataError, ModelMeta
from dilseg.runtime.segmenter import Segmenter
from dilseg.runtime.triton_url import is_triton_url

from .settings import ENV_MODEL

if TYPE_CHECKING:
    from dilseg.runtime.autoselect import Choice


class ModelChoiceError(DilsegError, RuntimeError):
    """The chosen model cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class BackendOption:
    key: str
    label: str
    backend: str  # open_backend's name
    providers: tuple[str, ...] | None  # ONNX Runtime provider aliases
    reason: str | None  # why it is unavailable here; None when available


@lru_cache(maxsize=1)
def backend_options() -> tuple[BackendOption, ...]:
    """Every backend the sidebar offers, with the reason an unavailable one cannot run here."""
    import onnxruntime as ort

    providers = ort.get_available_providers()
    cuda = None if "CUDAExecutionProvider" in providers else (
        "this onnxruntime has no CUDA provider (install onnxruntime-gpu and a CUDA runtime)")
    return (
        BackendOption("auto", "Auto (fastest here)", "auto", None, None),
        BackendOption("tensorrt", "TensorRT", "tensorrt", None, unavailable_reason("tensorrt")),
        BackendOption("openvino", "OpenVINO", "openvino", None, unavailable_reason("openvino")),
        BackendOption("ort-cpu", "ONNX Runtime CPU", "onnxruntime", ("cpu",), None),
        BackendOption("ort-cuda", "ONNX Runtime CUDA", "onnxruntime", ("cuda",), cuda),
    )


def option(key: str) -> BackendOption:
    for opt in backend_options():
        if opt.key == key:
            return opt
    raise ModelChoiceError(f"unknown backend {key!r}")


def launch_model() -> tuple[Path | str, str]:
    """The model the page starts with: `dilseg demo --model PATH` (or a triton:// URL, kept as the
    string it is), else the shipped default."""
    given = os.environ.get(ENV_MODEL, "").strip()
    if is_triton_url(given):
        return given, "from --model"
    if given:
        return Path(given).expanduser(), "from --model"
    return default_model_path(), "shipped default"


def missing_default_message(path: Path) -> str:
    return (f"The shipped model `{path.name}` is missing from this install (`{path.parent}`). Choose "
            "**Model file path** or **Upload .onnx** in the sidebar, or start the demo with `dilseg demo --model PATH`.")


UPLOADS_KEPT = 8  # uploaded models kept on disk; older ones are removed as new ones arrive


def save_upload(name: str, data: bytes) -> Path:
    """Keep an uploaded model on disk (ONNX Runtime loads from a path) as ``HASH/NAME``: the
    content hash lets reruns and other tabs reuse one copy, the upload's own name is what
    messages about it show. Only the ``UPLOADS_KEPT`` newest uploads are kept."""
    if not name.lower().endswith(".onnx"):
        raise ModelChoiceError(f"{name}: upload an .onnx model exported with `dilseg export onnx`")
    if not data:
        raise ModelChoiceError(f"{name}: the uploaded file is empty")
    root = Path(tempfile.gettempdir()) / "dilseg-demo-models"
    folder = root / hashlib.sha256(data).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (Path(name).name or "model.onnx")
    if not path.exists():
        atomic_write_bytes(path, data)  # a private temp name: two tabs may upload the same model
        _prune_uploads(root, keep=folder)
    return path


def _prune_uploads(root: Path, keep: Path) -> None:
    """Remove all but the newest ``UPLOADS_KEPT`` uploads (ONNX Runtime keeps a loaded model in
    memory, so a page using an older one goes on running)."""
    import shutil

    def age(entry: Path) -> float:
        try:
            return entry.stat().st_mtime
        except OSError:  # removed meanwhile by another tab's upload
            return 0.0

    for old in sorted((p for p in root.iterdir() if p != keep), key=age, reverse=True)[UPLOADS_KEPT - 1:]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:  # a copy named by hash alone, as older versions kept them
            old.unlink(missing_ok=True)


def check_model(path: Path) -> ModelMeta:
    """The model's metadata, or a ModelChoiceError that says what is wrong with the file."""
    if not path.exists():
        raise ModelChoiceError(f"`{path}`: no such file. Give the path of an .onnx or .engine exported by dilseg.")
    if path.suffix not in (".onnx", ".engine"):
        raise ModelChoiceError(f"`{path}`: not an .onnx or .engine file.")
    try:
        return read_meta(path)
    except MetadataError as exc:
        raise ModelChoiceError(f"This is not a dilseg segmentation model: {exc}") from None
    except OSError as exc:
        raise ModelChoiceError(f"`{path}`: cannot read it ({exc})") from None


def load_served(url: str) -> Segmenter:
    """A model served by Triton (the server, not the sidebar's backend, decides how it runs)."""
    try:
        return Segmenter(open_backend(url))
    except DilsegError as exc:
        raise ModelChoiceError(str(exc)) from None


def auto_choice(path: Path) -> "Choice | None":
    """What ``auto`` runs for ``path`` on this machine (a model with variants), or None."""
    stat = path.stat()
    return _auto_choice(str(path.resolve()), (stat.st_mtime_ns, stat.st_size))


@lru_cache(maxsize=8)
def _auto_choice(path: str, stamp: tuple[int, int]) -> "Choice | None":
    from dilseg.runtime.autoselect import pick

    return pick(Path(path))


def load_segmenter(path: Path, backend_key: str) -> Segmenter:
    """Open the backend and wrap it; every failure becomes a ModelChoiceError with the reason."""
    check_model(path)
    opt = option(backend_key)
    if opt.reason:
        raise ModelChoiceError(f"{opt.label} is not available here: {opt.reason}")
    kwargs = {"providers": list(opt.providers)} if opt.providers else {}
    choice = auto_choice(path) if opt.backend == "auto" else None
    try:
        if choice is not None:
            return Segmenter(open_backend(choice.path, choice.backend, **choice.options))
        return Segmenter(open_backend(path, opt.backend, **kwargs))
    except DilsegError as exc:
        raise ModelChoiceError(f"{opt.label} cannot run `{path.name}`: {exc}") from None
