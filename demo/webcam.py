"""The browser-webcam path: streamlit-webrtc hands each received frame to a processor that
segments it with the page's backend and sends the rendered picture back.

The processor lives in the session's state; the page updates its segmenter and view
settings on every rerun and the WebRTC thread reads them per frame.
"""

from __future__ import annotations

import threading
import time
import weakref

from dilseg.runtime.postprocess import render
from dilseg.runtime.segmenter import Segmenter

from .meter import Meter
from .settings import ViewSettings

_processors: "weakref.WeakValueDictionary[str, WebcamProcessor]" = weakref.WeakValueDictionary()
_lock = threading.Lock()


class WebcamProcessor:
    def __init__(self, session: str) -> None:
        self.session = session
        self.segmenter: Segmenter | None = None
        self.settings = ViewSettings()
        self.meter = Meter()
        self.error: str | None = None
        self.latest = None  # (labels, meta) of the newest processed frame
        with _lock:
            _processors[session] = self

    def __call__(self, frame):
        """av.VideoFrame in, av.VideoFrame out (runs in streamlit-webrtc's worker thread)."""
        import av

        segmenter, settings = self.segmenter, self.settings
        if segmenter is None:
            return frame
        t0 = time.perf_counter()
        image = frame.to_ndarray(format="bgr24")
        t1 = time.perf_counter()
        try:
            seg = segmenter(image)
            t2 = time.perf_counter()
            out = render(image, seg.labels, segmenter.meta, settings.view, settings.alpha, settings.visible_list)
        except Exception as exc:  # keep the call alive; the panel shows what went wrong
            self.error = f"{type(exc).__name__}: {exc}"
            return frame
        t3 = time.perf_counter()
        self.error = None
        self.latest = (seg.labels, segmenter.meta)
        self.meter.tick({"decode": (t1 - t0) * 1e3, **seg.timings, "render": (t3 - t2) * 1e3})
        result = av.VideoFrame.from_ndarray(out, format="bgr24")
        result.pts, result.time_base = frame.pts, frame.time_base
        return result


def stats() -> dict:
    with _lock:
        processors = list(_processors.values())
    return {p.session: {**p.meter.snapshot(), "error": p.error} for p in processors}
