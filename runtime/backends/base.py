"""What every backend is, shaped like Polygraphy's runners: ``load()`` once, ``infer()`` per frame,
``close()`` at the end (or ``with backend:``). The base writes those three, the loaded check
and the context manager once; a backend implements ``load_impl`` / ``infer_impl`` /
``close_impl`` and declares what more it can do in ``capabilities``.

Picking a backend for an artifact is not done here but in ``factory.py``.
"""

from __future__ import annotations

import abc
import functools
import importlib
import os
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import DilsegError
from ..metadata import ModelMeta


class BackendError(DilsegError, RuntimeError):
    """A backend cannot load or run an artifact; the message says what to do."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers beyond ``infer(tensor)``; callers test these, never attributes."""

    frame_input: bool = False  # infer_frame(bgr): uploads the frame once and preprocesses it on the GPU
    frame_batches: bool = False  # infer_frames([bgr, ...]): several frames at once, preprocessed by the backend
    gpu_render: bool = False  # render_last(...): colours and blends the last infer_frame() labels on the GPU
    # last_timings: the backend's own split of its last call (extra keys, ms); keys ending in
    # "preprocess" are preprocessing it did itself (see Backend.own_preprocess_ms).
    stage_timings: bool = False
    cuda_graph: bool = False  # set_cuda_graph(on): replays CUDA graphs (its cuda_graph option), switchable per call
    # Several threads may call infer at once (a multi-stream run's --instances); a backend whose
    # calls share one piece of native state says False and gets one caller at a time.
    concurrent_infer: bool = True


def has_nvidia_gpu() -> bool:
    """Whether the NVIDIA driver shows a GPU (desktop driver or Jetson), without loading CUDA."""
    return os.path.exists("/proc/driver/nvidia/gpus") or os.path.exists("/dev/nvidia0")


def import_reason(module: str, hint: str) -> str | None:
    """Why ``module`` cannot be imported here (missing, or installed but broken), or None."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError:
        return f"{module} is not installed ({hint})"
    except Exception as exc:  # noqa: BLE001 - a broken install (missing libnvinfer) is as unusable as a missing one
        return f"{module} is installed but does not import ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def unmet_needs(requires: tuple[tuple[str, str], ...], needs_nvidia_gpu: bool) -> str | None:
    """The first of these needs this machine does not meet, in words, or None."""
    for module, hint in requires:
        reason = import_reason(module, hint)
        if reason:
            return reason
    if needs_nvidia_gpu and not has_nvidia_gpu():
        return "no NVIDIA GPU seen (no /proc/driver/nvidia/gpus or /dev/nvidia0)"
    return None


PREPROCESS_TIMING = "preprocess"  # the ending of a last_timings key that times the backend's own preprocessing


def option_flag(name: str) -> str:
    """An option as the command line spells it (``cuda_graph`` -> ``--cuda-graph``), for messages."""
    return "--" + name.replace("_", "-")


def check_threads(threads: int | None) -> None:
    """Refuse a thread count (``--threads``) that is not a whole number >= 1; None is the backend's default."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise BackendError(f"--threads {threads}: must be a whole number >= 1")


@dataclass(frozen=True)
class BackendOptions:
    """A backend's options; each backend declares its own frozen dataclass of them.

    ``check(path)`` refuses options that cannot apply to this artifact (e.g. build options for an
    engine that is already built). Unknown options are refused by the factory, the same way for
    every backend.
    """

    def check(self, path: Path) -> None:
        """Raise BackendError when an option cannot apply to ``path``."""

    def given(self) -> dict:
        """The options that differ from their defaults (what was asked for)."""
        default = type(self)()
        return {k: v for k, v in vars(self).items() if getattr(default, k) != v}


@dataclass
class InferCounts:
    """What went through ``Backend.infer``: calls, the frames in them, the largest batch. A batch
    of four frames is one call and four items, so whether batching happens shows here."""

    calls: int = 0
    items: int = 0
    largest_batch: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, batch: int) -> None:
        with self._lock:
            self.calls += 1
            self.items += batch
            self.largest_batch = max(self.largest_batch, batch)

    def to_dict(self) -> dict:
        return {"calls": self.calls, "items": self.items, "largest_batch": self.largest_batch}


class Backend(abc.ABC):
    """Runs one artifact. ``meta`` is the artifact's metadata, known once loaded.

    ``infer`` takes the preprocessed NCHW float32 tensor and returns what the model returns:
    int32/uint8 labels (N, H, W) or float logits (N, C, H, W); ``meta.output_kind`` says which.
    """

    name: ClassVar[str]  # as in --backend NAME
    label: ClassVar[str]  # for people: "ONNX Runtime"
    suffixes: ClassVar[tuple[str, ...]]  # artifact suffixes it runs
    artifacts: ClassVar[str]  # the artifacts it runs, in words, for error messages
    selection_hint: ClassVar[str]  # how a user picks this backend, for error messages
    Options: ClassVar[type[BackendOptions]] = BackendOptions
    capabilities: ClassVar[Capabilities] = Capabilities()
    requires: ClassVar[tuple[tuple[str, str], ...]] = ()  # (module, how to install it) that it imports to run
    needs_nvidia_gpu: ClassVar[bool] = False

    @classmethod
    def available(cls) -> str | None:
        """Why this backend cannot run on this machine (a package missing, no GPU), or None when
        it can; asks without loading a model. Every list of backends (``dilseg info --backends``,
        the demo's sidebar) asks this."""
        return unmet_needs(cls.requires, cls.needs_nvidia_gpu)

    def __init__(self, path: str | Path, options: BackendOptions | None = None, **keywords) -> None:
        """``options``: the backend's options dataclass; or keywords for it (``threads=2``)."""
        self.path = Path(path)
        if options is not None and keywords:
            raise BackendError("pass backend options either as an options object or as keywords, not both")
        if options is None:
            known = [f.name for f in fields(self.Options)]
            unknown = [k for k in keywords if k not in known]
            if unknown:  # the factory names the backend they belong to; here they are just not ours
                raise BackendError(f"{', '.join(option_flag(k) for k in unknown)}: not option(s) of the {self.label} "
                                   f"backend (it takes: {', '.join(option_flag(k) for k in known) or 'none'})")
            options = self.Options(**keywords)
        self.options = options
        if not isinstance(self.options, self.Options):
            raise BackendError(f"the {self.label} backend takes {self.Options.__name__}, not "
                               f"{type(self.options).__name__}")
        self.meta: ModelMeta | None = None
        self.last_timings: dict[str, float] = {}
        self._loaded = False

    @classmethod
    def open(cls, path: Path, options: BackendOptions) -> "Backend":
        """A (not yet loaded) backend for ``path``; the factory calls this after checking ``options``."""
        return cls(path, options)

    # -- the lifecycle, written once ---------------------------------------------------------

    @property
    def is_loaded(self) -> bool:
        return self._loaded

    def load(self) -> "Backend":
        """Load once (later calls return at once); on failure everything taken so far is released."""
        if not self._loaded:
            try:
                self.load_impl()
            except BaseException:
                self.close_impl()
                raise
            self._loaded = True
        return self

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        self.require_loaded()
        output = self.infer_impl(tensor)
        self.counts.add(int(tensor.shape[0]) if tensor.ndim == 4 else 1)
        return output

    @functools.cached_property
    def counts(self) -> InferCounts:
        """Calls and frames through ``infer`` since the backend was made."""
        return InferCounts()

    def batch_range(self) -> tuple[int, int | None]:
        """The batch sizes ``infer`` takes: (smallest, largest), largest None for any size. The
        default suits an artifact fixed at one frame: several streams then run one at a time."""
        return (1, 1)

    def parallel_batches(self) -> bool:
        """Whether a batch runs as parallel requests lent per call, so that a second batch can
        start on the requests the first one has finished with (``--instances`` default 2)."""
        return False

    def close(self) -> None:
        """Release everything; safe to call twice."""
        if self._loaded:
            self._loaded = False
            self.close_impl()

    def require_file(self, what: str = "model") -> None:
        """Refuse a missing artifact in one line before a library tries to open it."""
        if not self.path.is_file():
            raise BackendError(f"{self.path}: no such {what} file")

    def require_loaded(self) -> None:
        if not self._loaded:
            raise BackendError(f"the {self.label} backend is not loaded (or already closed); call load() first")

    def __enter__(self) -> "Backend":
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- optional, as declared in ``capabilities`` -------------------------------------------

    def infer_frame(self, frame_bgr: np.ndarray) -> np.ndarray:
        """BGR uint8 frame -> model output, preprocessed by the backend (``capabilities.frame_input``)."""
        raise BackendError(f"the {self.label} backend takes preprocessed tensors only (capabilities.frame_input)")

    def infer_frames(self, frames: list[np.ndarray]) -> np.ndarray:
        """BGR uint8 frames of one size -> the model's outputs, stacked (``capabilities.frame_batches``)."""
        raise BackendError(f"the {self.label} backend takes one frame per call (capabilities.frame_batches)")

    def own_preprocess_ms(self) -> float:
        """Milliseconds of the last call that the backend spent preprocessing itself (its
        ``last_timings`` keys ending in ``preprocess``: ``gpu_preprocess``, ``host_preprocess``);
        0 when it declares no ``stage_timings``. A frame-input backend reports its preprocessing
        with this, so "preprocess" and "infer" mean the same on every backend."""
        if not self.capabilities.stage_timings:
            return 0.0
        return sum(ms for key, ms in self.last_timings.items() if key.endswith(PREPROCESS_TIMING))

    def set_cuda_graph(self, on: bool) -> None:
        """Replay CUDA graphs from the next call on, or not (``capabilities.cuda_graph``)."""
        raise BackendError(f"the {self.label} backend has no CUDA graphs (capabilities.cuda_graph)")

    def render_last(self, alpha: float = 0.5, visible: list[int] | None = None,
                    view: str = "overlay") -> tuple[np.ndarray, np.ndarray]:
        """(BGR picture, uint8 labels) at frame size for the last infer_frame() (``capabilities.gpu_render``)."""
        raise BackendError(f"the {self.label} backend has no GPU renderer (capabilities.gpu_render)")

    # -- what a backend writes ------------------------------------------------------------------

    @abc.abstractmethod
    def load_impl(self) -> None:
        """Open the artifact and set ``self.meta``."""

    @abc.abstractmethod
    def infer_impl(self, tensor: np.ndarray) -> np.ndarray:
        """One inference on a preprocessed NCHW tensor."""

    @abc.abstractmethod
    def close_impl(self) -> None:
        """Free what load_impl took; also called after a failed load_impl, so it must cope with a partial one."""
