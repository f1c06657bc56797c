"""Allocation failures told as one line: a big image under a memory limit (a container's, a
``ulimit -v``, a small Jetson) ends with "out of memory" and what to do, not with a traceback from
inside OpenCV, numpy or ONNX Runtime. Out of memory is the environment's limit, not a bug."""

from __future__ import annotations

import re
import sys

ADVICE = ("the frames or images are too large for the memory this process may use: downscale the input, "
          "lower DILSEG_MAX_IMAGE_PIXELS to refuse such images up front, or give the process more memory")


def _ort_alloc_failure(exc: BaseException) -> bool:
    ort = sys.modules.get("onnxruntime.capi.onnxruntime_pybind11_state")
    if ort is None or not isinstance(exc, (ort.RuntimeException, ort.Fail)):
        return False
    text = str(exc)
    return "Failed to allocate" in text or "bad_alloc" in text or "bad allocation" in text


def out_of_memory(exc: BaseException) -> str | None:
    """"out of memory (...)" with advice when ``exc`` is an allocation failure, else None."""
    cv2 = sys.modules.get("cv2")
    if isinstance(exc, MemoryError):
        detail = str(exc) or "an allocation failed"
    elif cv2 is not None and isinstance(exc, cv2.error) and getattr(exc, "code", None) == cv2.Error.StsNoMem:
        wanted = re.search(r"allocate (\d+) bytes", str(exc))
        detail = f"OpenCV could not allocate {int(wanted.group(1)) / (1 << 20):.0f} MiB" if wanted else \
            "OpenCV: insufficient memory"
    elif _ort_alloc_failure(exc):
        detail = "ONNX Runtime could not allocate its buffers"
    else:
        return None
    return f"out of memory ({detail.strip()}); {ADVICE}"
