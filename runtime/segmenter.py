"""Frame in, label map out: preprocess -> backend -> postprocess with per-stage timings, and the
picture of a result.

The single place the three stages are chained, used by the pipeline, the benchmark, the
evaluator and the demo alike, and the library's face::

    seg = open_segmenter("model.onnx")
    result = seg.process(frame)
    overlay = seg.render(result, ViewSettings(alpha=0.6))
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends.base import Backend, BackendError
from .postprocess import postprocess
from .preprocess import preprocess
from .view import ViewSettings


@dataclass
class Segmentation:
    labels: np.ndarray  # HxW uint8 class ids at the frame's size
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds per stage
    frame: np.ndarray | None = None  # the frame it was made from (not a copy)
    batch: int | None = None  # the shared inference it ran in, when streams share a backend (runtime/batching)


class Segmenter:
    """A loaded backend and the processing around it. ``process(frame)`` (or calling it)
    segments one BGR uint8 frame; ``render(result, view)`` draws a result; ``close()`` (or
    ``with``) releases the backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.meta = backend.meta
        self._last: Segmentation | None = None  # what the backend's GPU buffers hold now
        # Held from a frame upload to its result being recorded, and while rendering on the GPU,
        # so a render never draws the buffers of another thread's newer frame.
        self._gpu_lock = threading.Lock()

    def process(self, frame: np.ndarray) -> Segmentation:
        """Segment one BGR uint8 frame. Timings (ms) mean the same on every backend:
        "preprocess" is the frame made into the model's input, by the CPU or, on a frame-input
        backend, by the backend itself (its own split); "infer" is the wall time of the rest of
        the backend call; "postprocess" the labels brought to the frame's size. A backend with
        ``stage_timings`` adds its own split under its own names."""
        caps = self.backend.capabilities
        frame_input = caps.frame_input
        t0 = time.perf_counter()
        if frame_input:
            # The uint8 frame crosses the bus once and a CUDA kernel resizes and normalises it
            # straight into the engine's input buffer.
            with self._gpu_lock:
                output = self.backend.infer_frame(frame)
                own = dict(self.backend.last_timings) if caps.stage_timings else {}
                pre_ms = self.backend.own_preprocess_ms()
                self._last = marker = Segmentation(np.empty((0, 0), np.uint8), {}, frame)
            call_ms = (time.perf_counter() - t0) * 1e3
        else:
            tensor = preprocess(frame, self.meta)
            t1 = time.perf_counter()
            output = self.backend.infer(tensor)
            own = dict(self.backend.last_timings) if caps.stage_timings else {}
            pre_ms, call_ms = (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3
        t2 = time.perf_counter()
        labels = postprocess(output, self.meta, frame.shape)
        postprocess_ms = (time.perf_counter() - t2) * 1e3
        infer_ms = max(0.0, call_ms - pre_ms) if frame_input else call_ms
        timings = {"preprocess": pre_ms, "infer": infer_ms, "postprocess": postprocess_ms, **own}
        result = Segmentation(labels, timings, frame)
        if frame_input:
            with self._gpu_lock:
                if self._last is marker:  # no other frame went up meanwhile
                    self._last = result
        return result

    __call__ = process

    def render(self, result: Segmentation, view: ViewSettings = ViewSettings()) -> np.ndarray:
        """The BGR picture of ``result`` as ``view`` asks. On a backend with a GPU renderer,
        the result it processed last is coloured and blended on the GPU, where its labels and
        frame already are (overlay and mask; side-by-side and the legend are added on the
        CPU); anything else is drawn on the CPU, to the same picture."""
        if result.frame is None:
            raise ValueError("this Segmentation carries no frame; render it with ViewSettings.render(frame, ...)")
        picture = None
        if self.backend.capabilities.gpu_render:
            with self._gpu_lock:
                if result is self._last:
                    try:
                        picture, _ = self.backend.render_last(view.alpha, view.visible_list,
                                                              "mask" if view.view == "mask" else "overlay")
                    except BackendError:  # no GPU kernels here (no nvcc) or a logits model: the CPU draws it
                        picture = None
            if picture is not None:
                if view.view == "side-by-side":
                    picture = np.concatenate([result.frame, picture], axis=1)
                if view.legend:
                    from .postprocess import class_areas, draw_legend

                    picture = draw_legend(picture, self.meta, class_areas(result.labels, self.meta.num_classes),
                                          view.visible_list)
                return picture
        return view.render(result.frame, result.labels, self.meta)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Segmenter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_segmenter(model: str | Path | None = None, backend: str = "auto", **options) -> Segmenter:
    """Load ``model`` (.onnx, .engine, .safetensors, or a served ``triton://HOST:PORT/MODEL``;
    default: the shipped CamVid model) on ``backend`` ("auto" picks by the file's suffix) with
    the backend's ``options`` (e.g. ``threads=2`` for ONNX Runtime). Raises a DilsegError
    subclass saying what to do when it cannot."""
    from .backends import open_backend
    from .defaults import default_model_path

    # As given: open_backend tells a URL from a path (Path() would fold triton:// into triton:/).
    return Segmenter(open_backend(model if model is not None else default_model_path(), backend, **options))
