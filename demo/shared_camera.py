"""One capture-and-inference worker per server source, shared by every viewer in the process.

A camera can be opened once only, and inference is the expensive part, so tabs never get
their own: the page calls ``acquire(spec, segmenter)``, which returns the running worker for
that source or opens the source and starts one. Workers on one loaded backend share it through
one Batcher (runtime/batching.py): the frames of several sources run in one inference when the
model's batch axis is free, else one after another, at most one frame per source each time. A worker is the runtime's Pipeline (the one
`dilseg run` uses) with a publishing sink: each result is drawn and JPEG-encoded once per
distinct view that an open stream asks for, and the newest is handed to the MJPEG route.
A viewer (a browser tab) holds at most one stream per worker: a new stream from it ends the
one before (a changed view opens a new URL), and ``release_viewer`` ends them when its page
stops showing the source, so no abandoned stream stays open or keeps being drawn. A file
is played as a camera (paced, looping). A worker nobody watches for ``IDLE_S`` seconds
closes its source and leaves the registry.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

from dilseg.runtime.batching import Batcher, StreamSegmenter, frame_waiting
from dilseg.runtime.errors import DilsegError
from dilseg.runtime.metadata import ModelMeta
from dilseg.runtime.pipeline import FrameResult, Pipeline
from dilseg.runtime.segmenter import Segmenter
from dilseg.runtime.sinks import LatestSink
from dilseg.runtime.view import ViewSettings

from .meter import Meter

IDLE_S = 10.0  # seconds a worker runs on with no stream open and no page showing it
JPEG_QUALITY = 80


def jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 BGR image
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


@dataclass(frozen=True)
class Published:
    """The newest result of a worker and its pictures for the views open streams asked for."""

    seq: int
    result: FrameResult
    jpegs: dict[ViewSettings, bytes] = field(default_factory=dict)

    @property
    def index(self) -> int:  # the frame's number as captured (test:// frame i is test_frame(i))
        return self.result.index

    @property
    def frame(self) -> np.ndarray:
        return self.result.frame

    @property
    def labels(self) -> np.ndarray:
        return self.result.labels

    @property
    def meta(self) -> ModelMeta:
        return self.result.meta


def encode_view(result: FrameResult, settings: ViewSettings) -> bytes:
    """One viewer's picture of a result, as JPEG."""
    return jpeg(settings.render(result.frame, result.labels, result.meta))


@dataclass(eq=False)
class Stream:
    """One open MJPEG response: its viewer (None: anonymous), what it shows, how to wake it."""

    viewer: str | None
    settings: ViewSettings
    wake: Callable[[], None]
    meter: Meter
    closed: bool = False


class Publisher(LatestSink):
    """The worker's sink: the newest result with a JPEG per view that an open stream shows."""

    spec = "publish:mjpeg"

    def __init__(self) -> None:
        super().__init__()
        self._streams: list[Stream] = []
        self._meters: dict[str, Meter] = {}  # per viewer, kept across its streams

    def open_stream(self, viewer: str | None, settings: ViewSettings, wake: Callable[[], None]) -> Stream:
        """Register a stream; the viewer's earlier streams on this worker are closed and woken."""
        with self._cond:
            ended = [s for s in self._streams if viewer is not None and s.viewer == viewer]
            for old in ended:
                old.closed = True
                self._streams.remove(old)
                self._listeners.remove(old.wake)
            stream = Stream(viewer, settings, wake, self._meters.setdefault(viewer or "anonymous", Meter()))
            self._streams.append(stream)
            self._listeners.append(wake)
        for old in ended:
            old.wake()
        return stream

    def close_stream(self, stream: Stream) -> None:
        with self._cond:
            stream.closed = True
            if stream in self._streams:
                self._streams.remove(stream)
                self._listeners.remove(stream.wake)

    def release(self, viewer: str) -> int:
        """Close every stream of ``viewer`` (its page no longer shows this source); how many."""
        with self._cond:
            ended = [s for s in self._streams if s.viewer == viewer]
        for stream in ended:
            self.close_stream(stream)
            stream.wake()
        return len(ended)

    @property
    def connections(self) -> int:
        with self._cond:
            return len(self._streams)

    def views(self) -> list[ViewSettings]:
        """The distinct views of the open streams: what each frame is drawn in."""
        with self._cond:
            return list(dict.fromkeys(s.settings for s in self._streams))

    def prepare(self, result: FrameResult) -> Published:
        # Drawn here, once per frame and view: however many tabs watch, a frame is rendered and
        # encoded once per distinct view, and a stream shows every frame the worker makes.
        jpegs, drawn = {}, 0.0
        for settings in self.views():
            t0 = time.perf_counter()
            image = settings.render(result.frame, result.labels, result.meta)
            drawn += time.perf_counter() - t0
            jpegs[settings] = jpeg(image)
        result.timings["render"] = result.timings.get("render", 0.0) + drawn * 1e3
        return Published(self.seq + 1, result, jpegs)

    def viewer_stats(self) -> list[dict]:
        """Each viewer's counters, without its id: a viewer's id is what ends its stream, so it
        is never shown (a page asks for its own viewer's with ``viewer_snapshot``)."""
        with self._cond:
            names = list(self._meters)
        return [self.viewer_snapshot(name) for name in names]

    def viewer_snapshot(self, viewer: str) -> dict:
        """One viewer's counters and open streams ({} for a viewer never seen)."""
        with self._cond:
            meter = self._meters.get(viewer)
            streams = sum((s.viewer or "anonymous") == viewer for s in self._streams)
        return {**meter.snapshot(), "streams": streams} if meter is not None else {}


def redact(spec: str) -> str:
    """A spec fit to show: stream credentials (rtsp://user:pass@host) hidden."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", spec)


def worker_id(spec: str) -> str:
    """A URL-safe name for a source spec (specs hold slashes, colons, credentials)."""
    return hashlib.sha1(spec.encode()).hexdigest()[:12]


class CameraWorker:
    def __init__(self, spec: str, source, segmenter: Segmenter) -> None:
        self.spec = spec
        self.id = worker_id(spec)
        self.meter = Meter()
        self.error: str | None = None
        self.source = source
        self.publisher = Publisher()
        self.pipeline = Pipeline(source, _stream_of(segmenter, spec), [self.publisher], view=None,
                                 handle_signals=False, on_result=self._on_result)
        self.pipeline.segmenter.waiting = lambda: frame_waiting(self.pipeline)
        self._stop = threading.Event()
        self._last_wanted = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"dilseg-camera-{self.id}", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "CameraWorker":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        self.pipeline.stop("stop()")

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def touch(self) -> None:
        """A page still shows this source: keep it running even between stream reconnects."""
        self._last_wanted = time.monotonic()

    @property
    def segmenter(self) -> Segmenter:
        return self.pipeline.segmenter

    def set_segmenter(self, segmenter: Segmenter) -> None:
        old = self.pipeline.segmenter
        if old.backend is segmenter.backend:
            return
        new = _stream_of(segmenter, self.spec)
        new.waiting = lambda: frame_waiting(self.pipeline)
        self.pipeline.segmenter = new  # the pipeline reads it once per frame
        old.close()  # its frame in flight still finishes

    # -- viewers ---------------------------------------------------------------------------
    def open_stream(self, viewer: str | None, settings: ViewSettings, wake: Callable[[], None]) -> Stream:
        """A stream starts; ``wake()`` is then called (from the worker's output thread) after every
        new result, which carries the JPEG of ``settings``. The viewer's earlier stream ends."""
        self.touch()
        return self.publisher.open_stream(viewer, settings, wake)

    def close_stream(self, stream: Stream) -> None:
        self.publisher.close_stream(stream)
        self.touch()

    def release(self, viewer: str) -> int:
        return self.publisher.release(viewer)

    def viewer_stats(self, viewer: str) -> dict:
        """What ``viewer`` was shown (frames, FPS, latency) and its open streams."""
        return self.publisher.viewer_snapshot(viewer)

    def latest(self) -> Published | None:
        return self.publisher.latest()

    # -- the loop --------------------------------------------------------------------------
    def _idle(self) -> bool:
        return self.publisher.connections == 0 and time.monotonic() - self._last_wanted > IDLE_S

    def _on_result(self, result: FrameResult) -> None:
        self.meter.tick(result.timings)
        if self._idle():
            self.pipeline.stop("idle")

    def _run(self) -> None:
        try:
            stats = self.pipeline.run()
            if not self._stop.is_set() and stats.stopped_by in ("", "source lost"):
                self.error = f"{self.spec}: the source stopped delivering frames" + (
                    " (gave up reconnecting)" if stats.stopped_by else "")
        except DilsegError as exc:  # written for the user: shown on the page as it is
            self.error = f"{self.spec}: {exc}"
        except Exception as exc:  # shown on the page; the app itself carries on
            self.error = f"{self.spec}: {type(exc).__name__}: {exc}"
        finally:
            self._stop.set()
            self.pipeline.segmenter.close()  # the shared batches stop waiting for this source
            try:
                self.source.close()
            finally:
                self.publisher.close()  # wakes every stream, which then ends
                _forget(self)

    # -- reporting -------------------------------------------------------------------------
    def stats(self) -> dict:
        latest = self.latest()
        return {
            "id": self.id,
            "spec": redact(self.spec),
            "alive": self.alive,
            "error": self.error,
            "model": self.segmenter.meta.model,
            "connections": self.publisher.connections,  # open MJPEG streams
            "views": len(self.publisher.views()),  # distinct pictures drawn per frame
            "latest_index": latest.index if latest else None,
            **self.pipeline.counters(),  # frames_in/out, dropped, corrupt_skipped, reopens (ints)
            "viewers": self.publisher.viewer_stats(),  # per viewer, without ids
            **self.meter.snapshot(),
        }


# -- the process-wide registry -------------------------------------------------------------
_lock = threading.Lock()
_batchers: dict[int, Batcher] = {}  # id(backend) -> the Batcher its workers share
_batchers_lock = threading.Lock()  # its own: workers are made while _lock is held
_workers: dict[str, CameraWorker] = {}
_opened: dict[str, int] = {}  # how often each spec's source was opened (a test and a log read it)
_last_error: dict[str, str] = {}  # why a spec's last worker ended, for the page to show


def _stream_of(segmenter: Segmenter, spec: str) -> StreamSegmenter:
    """A worker's way into the Batcher of ``segmenter``'s backend (made on first use)."""
    backend = segmenter.backend
    with _batchers_lock:
        for key, batcher in list(_batchers.items()):
            if not batcher.backend.is_loaded:  # a model the page let go of
                batcher.close()
                del _batchers[key]
        batcher = _batchers.get(id(backend))
        if batcher is None:
            batcher = _batchers[id(backend)] = Batcher(backend)
        return batcher.stream(redact(spec))


def _open(spec: str):
    from dilseg.runtime.sources import open_source  # a missing camera raises SourceError here

    # A file (or image, or folder) plays as a camera: at its frame rate, from the start again at its end.
    return open_source(spec, loop=True)


def acquire(spec: str, segmenter: Segmenter) -> CameraWorker:
    """The running worker for ``spec`` (now using ``segmenter``), or a new one.

    Opening happens under the lock, so two tabs that press Start together still open the
    source once. Raises the source's own error (SourceError) when it cannot be opened.
    """
    spec = spec.strip()
    with _lock:
        dying = _workers.get(spec)
    if dying is not None and not dying.alive:
        dying.join(5)  # outside the lock (it needs the lock to leave): let it release the device
    with _lock:
        worker = _workers.get(spec)
        if worker is not None and worker.alive:
            worker.set_segmenter(segmenter)
            worker.touch()
            return worker
        source = _open(spec)
        _last_error.pop(spec, None)
        _opened[spec] = _opened.get(spec, 0) + 1
        worker = CameraWorker(spec, source, segmenter)
        _workers[spec] = worker
        return worker.start()


def _forget(worker: CameraWorker) -> None:
    with _lock:
        if _workers.get(worker.spec) is worker:
            del _workers[worker.spec]
        if worker.error:
            _last_error[worker.spec] = worker.error


def last_error(spec: str) -> str | None:
    """Why the last worker of ``spec`` stopped, if it failed."""
    with _lock:
        return _last_error.get(spec.strip())


def find(worker_id_: str) -> CameraWorker | None:
    with _lock:
        for worker in _workers.values():
            if worker.id == worker_id_:
                return worker
    return None


def running(spec: str) -> CameraWorker | None:
    with _lock:
        return _workers.get(spec.strip())


def release_viewer(viewer: str, keep: CameraWorker | None = None) -> int:
    """End every stream of ``viewer`` except on ``keep`` (its page stopped showing a server
    source, or now shows another one); how many."""
    with _lock:
        workers = [w for w in _workers.values() if w is not keep]
    return sum(worker.release(viewer) for worker in workers)


def stats() -> dict:
    with _lock:
        workers = list(_workers.values())
        opened = dict(_opened)
    return {"workers": {redact(w.spec): w.stats() for w in workers},
            "opened": {redact(spec): n for spec, n in opened.items()}}


def stop_all() -> None:
    with _lock:
        workers = list(_workers.values())
    for worker in workers:
        worker.stop()
    for worker in workers:
        worker.join(5)
    with _batchers_lock:
        batchers = list(_batchers.values())
        _batchers.clear()
    for batcher in batchers:
        batcher.close()
