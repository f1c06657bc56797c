"""Frame in, label map out: preprocess -> backend -> postprocess with per-stage timings.

The single place the three stages are chained, used by the pipeline, the benchmark,
the evaluator and the demo alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .backends.base import Backend
from .postprocess import postprocess
from .preprocess import preprocess


@dataclass
class Segmentation:
    labels: np.ndarray  # HxW uint8 class ids at the frame's size
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds per stage


class Segmenter:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.meta = backend.meta

    def __call__(self, frame: np.ndarray) -> Segmentation:
        t0 = time.perf_counter()
        infer_frame = getattr(self.backend, "infer_frame", None)
        if infer_frame is not None:
            # TensorRT with pycuda: the uint8 frame crosses the bus once and a CUDA kernel
            # resizes and normalises it straight into the engine's input buffer.
            t1 = t0
            output = infer_frame(frame)
        else:
            tensor = preprocess(frame, self.meta)
            t1 = time.perf_counter()
            output = self.backend.infer(tensor)
        t2 = time.perf_counter()
        labels = postprocess(output, self.meta, frame.shape)
        t3 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3}
        # A backend that splits its own time (TensorRT: upload/infer/download) reports it too.
        timings.update(getattr(self.backend, "last_timings", None) or {})
        return Segmentation(labels, timings)
