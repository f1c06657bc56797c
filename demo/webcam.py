"""The browser-webcam path: streamlit-webrtc hands each received frame to a processor, which
pushes it into the runtime's Pipeline (the one `dilseg run` uses: capture, inference and
drawing in their own threads, the newest frame only) and sends back the newest rendered
picture.

The processor lives in the session's state; the page sets its segmenter and view settings on
every rerun and the pipeline reads them per frame. A pipeline whose browser stopped sending
frames ends after ``IDLE_S`` seconds; the next frame starts a new one.
"""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np

from dilseg.runtime.errors import DilsegError
from dilseg.runtime.pipeline import FrameResult, Pipeline
from dilseg.runtime.segmenter import Segmenter
from dilseg.runtime.sinks import LatestSink
from dilseg.runtime.sources import PushSource
from dilseg.runtime.view import ViewSettings

from .meter import Meter

IDLE_S = 3.0  # seconds without a frame from the browser before its pipeline ends
RETRY_S = 1.0  # after a failed run, how long frames pass through unsegmented before a new try

_processors: "weakref.WeakValueDictionary[str, WebcamProcessor]" = weakref.WeakValueDictionary()
_lock = threading.Lock()


def _to_bgr(frame) -> np.ndarray:
    return frame.to_ndarray(format="bgr24")  # av.VideoFrame -> BGR uint8, in the capture thread


class WebcamProcessor:
    def __init__(self, session: str) -> None:
        self.session = session
        self._segmenter: Segmenter | None = None
        self._settings = ViewSettings()
        self.meter = Meter()
        self.error: str | None = None
        self.latest = None  # (labels, meta) of the newest processed frame
        self._lock = threading.Lock()
        self._source: PushSource | None = None
        self._pipeline: Pipeline | None = None
        self._sink = LatestSink()
        self._failed_at = 0.0
        with _lock:
            _processors[session] = self

    # The page sets these on every rerun; a running pipeline takes them from its next frame.
    @property
    def segmenter(self) -> Segmenter | None:
        return self._segmenter

    @segmenter.setter
    def segmenter(self, segmenter: Segmenter | None) -> None:
        self._segmenter = segmenter
        if self._pipeline is not None and segmenter is not None:
            self._pipeline.segmenter = segmenter

    @property
    def settings(self) -> ViewSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: ViewSettings) -> None:
        self._settings = settings
        if self._pipeline is not None:
            self._pipeline.view = settings

    def _running_source(self) -> PushSource | None:
        """The source of the running pipeline, starting one if none runs (None while a failed
        run's retry delay lasts)."""
        with self._lock:
            if self._source is not None and not self._source.ended:
                return self._source
            if self.error and time.monotonic() - self._failed_at < RETRY_S:
                return None
            self._source = PushSource("webrtc://browser", convert=_to_bgr, idle_s=IDLE_S)
            self._sink = LatestSink()
            self._pipeline = Pipeline(self._source, self._segmenter, [self._sink], view=self._settings,
                                      handle_signals=False, on_result=self._on_result)
            threading.Thread(target=self._run, args=(self._pipeline,), name=f"dilseg-webcam-{self.session}",
                             daemon=True).start()
            return self._source

    def _run(self, pipeline: Pipeline) -> None:
        try:
            pipeline.run()
        except DilsegError as exc:  # keep the call alive; the panel shows what went wrong
            self.error, self._failed_at = str(exc), time.monotonic()
        except Exception as exc:  # noqa: BLE001 - a backend failing mid-call must not end the WebRTC session
            self.error, self._failed_at = f"{type(exc).__name__}: {exc}", time.monotonic()
        finally:
            pipeline.source.close()

    def _on_result(self, result: FrameResult) -> None:
        self.error = None
        self.latest = (result.labels, result.meta)
        self.meter.tick(result.timings)

    def __call__(self, frame):
        """av.VideoFrame in, av.VideoFrame out (runs in streamlit-webrtc's worker thread): the
        frame goes to the pipeline, the newest rendered picture comes back (the raw frame until
        there is one)."""
        import av

        if self._segmenter is None:
            return frame
        source = self._running_source()
        if source is not None:
            source.push(frame)
        latest: FrameResult | None = self._sink.latest()
        if latest is None or latest.rendered is None or self.error:
            return frame
        out = av.VideoFrame.from_ndarray(latest.rendered, format="bgr24")
        out.pts, out.time_base = frame.pts, frame.time_base
        return out


def stats() -> list[dict]:
    """Each browser webcam's counters, without its session id (the id that ends its streams)."""
    with _lock:
        processors = list(_processors.values())
    return [{**p.meter.snapshot(), "error": p.error} for p in processors]
