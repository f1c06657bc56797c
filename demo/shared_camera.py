"""One capture-and-inference worker per server source, shared by every viewer in the process.

A camera can be opened once only, and inference is the expensive part, so tabs never get
their own: the page calls ``acquire(spec, segmenter)``, which returns the running worker for
that source or opens the source and starts one. Viewers read the newest result (the MJPEG
route renders it with their own view settings). A worker nobody watches for ``IDLE_S``
seconds closes its source and leaves the registry.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from dilseg.runtime.metadata import ModelMeta
from dilseg.runtime.postprocess import render
from dilseg.runtime.segmenter import Segmenter

from .meter import Meter
from .settings import ViewSettings

IDLE_S = 10.0  # seconds a worker runs on with no stream open and no page showing it
FILE_FPS = 10.0  # pace of a looping still image or a file without a frame rate
JPEG_QUALITY = 80


@dataclass(frozen=True)
class Result:
    seq: int
    index: int  # the source's own frame number (test:// frame i is test_frame(i))
    frame: np.ndarray  # BGR as captured
    labels: np.ndarray  # HxW class ids at frame size
    meta: ModelMeta
    timings: dict[str, float] = field(default_factory=dict)
    jpegs: dict[ViewSettings, bytes] = field(default_factory=dict)  # the views viewers asked for


def encode_view(result: Result, settings: ViewSettings, quality: int = JPEG_QUALITY) -> bytes:
    """One viewer's picture of a result, as JPEG."""
    image = render(result.frame, result.labels, result.meta, settings.view, settings.alpha, settings.visible_list)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 BGR image
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def redact(spec: str) -> str:
    """A spec fit to show: stream credentials (rtsp://user:pass@host) hidden."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", spec)


def worker_id(spec: str) -> str:
    """A URL-safe name for a source spec (specs hold slashes, colons, credentials)."""
    return hashlib.sha1(spec.encode()).hexdigest()[:12]


class CameraWorker:
    def __init__(self, spec: str, source, segmenter: Segmenter, reopen=None) -> None:
        self.spec = spec
        self.id = worker_id(spec)
        self.segmenter = segmenter
        self.meter = Meter()
        self.error: str | None = None
        self._source = source
        self._reopen = reopen  # for file sources: start again at the end
        self._cond = threading.Condition()
        self._latest: Result | None = None
        self._stop = threading.Event()
        self._viewers: dict[str, Meter] = {}
        self._views: dict[ViewSettings, int] = {}  # settings of the open streams (refcounted)
        self._listeners: list = []  # thread-safe callables told about every new result
        self._connections = 0
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
        interrupt = getattr(self._source, "interrupt", None)
        if interrupt:  # wake a read that waits for the next frame or a reconnect
            interrupt()
        with self._cond:
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def touch(self) -> None:
        """A page still shows this source: keep it running even between stream reconnects."""
        self._last_wanted = time.monotonic()

    def set_segmenter(self, segmenter: Segmenter) -> None:
        # Plain attribute swap: the loop picks it up on its next frame.
        self.segmenter = segmenter

    # -- viewers ---------------------------------------------------------------------------
    def connect(self, viewer: str, listener=None, settings: ViewSettings | None = None) -> Meter:
        """A viewer starts watching; ``listener()`` is then called (from the worker thread)
        after every new result, which carries the JPEG of ``settings``. Returns the
        viewer's display meter."""
        with self._cond:
            self._connections += 1
            meter = self._viewers.setdefault(viewer, Meter())
            if listener is not None:
                self._listeners.append(listener)
            if settings is not None:
                self._views[settings] = self._views.get(settings, 0) + 1
        self.touch()
        return meter

    def disconnect(self, viewer: str, listener=None, settings: ViewSettings | None = None) -> None:
        with self._cond:
            self._connections -= 1
            if listener is not None and listener in self._listeners:
                self._listeners.remove(listener)
            if settings is not None and settings in self._views:
                self._views[settings] -= 1
                if self._views[settings] <= 0:
                    del self._views[settings]
        self.touch()

    def latest(self) -> Result | None:
        with self._cond:
            return self._latest

    def wait_newer(self, seq: int, timeout: float) -> Result | None:
        """The newest result with a sequence number above ``seq``, or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._latest is None or self._latest.seq <= seq) and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return None
                self._cond.wait(left)
            return self._latest if self._latest is not None and self._latest.seq > seq else None

    # -- the loop --------------------------------------------------------------------------
    def _idle(self) -> bool:
        return self._connections <= 0 and time.monotonic() - self._last_wanted > IDLE_S

    def _run(self) -> None:
        seq = 0
        next_due = time.monotonic()
        try:
            while not self._stop.is_set() and not self._idle():
                t0 = time.perf_counter()
                frame = self._source.read()
                t1 = time.perf_counter()
                if frame is None:
                    if self._stop.is_set():  # stop() interrupted the read: not the source's fault
                        break
                    if self._source.live or self._reopen is None:
                        self.error = (f"{self.spec}: the source stopped delivering frames"
                                      if self._source.live else f"{self.spec}: end of the video")
                        break
                    self._source.close()
                    self._source = self._reopen()
                    continue
                segmenter = self.segmenter
                seg = segmenter(frame)
                seq += 1
                timings = {"capture": (t1 - t0) * 1e3, **seg.timings}
                index = getattr(self._source, "index", seq - 1)
                result = Result(seq, index, frame, seg.labels, segmenter.meta, timings)
                # Draw each requested view here, once per frame: however many tabs watch,
                # a frame is rendered and JPEG-encoded once per distinct view, and a stream
                # shows every frame the worker makes instead of racing it for the CPU.
                with self._cond:
                    views = list(self._views)
                t2 = time.perf_counter()
                for settings in views:
                    result.jpegs[settings] = encode_view(result, settings)
                if views:
                    timings["render+jpeg"] = (time.perf_counter() - t2) * 1e3
                with self._cond:
                    self._latest = result
                    self._cond.notify_all()
                    listeners = list(self._listeners)
                for listener in listeners:
                    listener()
                self.meter.tick(timings)
                # A live source paces itself by blocking in read(); a file (or a still image,
                # which loops) would race ahead, so hold it to its own frame rate.
                if not self._source.live:
                    next_due = max(next_due + 1.0 / (self._source.fps or FILE_FPS), time.monotonic() - 1.0)
                    delay = next_due - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
        except Exception as exc:  # shown on the page; the app itself carries on
            self.error = f"{self.spec}: {type(exc).__name__}: {exc}"
        finally:
            self._stop.set()
            try:
                self._source.close()
            finally:
                with self._cond:
                    self._cond.notify_all()
                    listeners = list(self._listeners)
                for listener in listeners:
                    listener()
                _forget(self)

    # -- reporting -------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._cond:
            viewers = {name: m.snapshot() for name, m in self._viewers.items()}
            connections = self._connections
        return {
            "id": self.id,
            "spec": redact(self.spec),
            "alive": self.alive,
            "error": self.error,
            "model": self.segmenter.meta.model,
            "connections": connections,
            "latest_index": latest.index if (latest := self.latest()) else None,
            "skipped_frames": getattr(self._source, "skipped", 0),  # live frames passed over for newer ones
            "viewers": viewers,
            **self.meter.snapshot(),
        }


# -- the process-wide registry -------------------------------------------------------------
_lock = threading.Lock()
_workers: dict[str, CameraWorker] = {}
_opened: dict[str, int] = {}  # how often each spec's source was opened (a test and a log read it)
_last_error: dict[str, str] = {}  # why a spec's last worker ended, for the page to show


def _open(spec: str):
    from dilseg.runtime.sources import NewestFrame, open_source  # a missing camera raises SourceError here

    source = open_source(spec)
    # The worker segments one frame at a time: a live source drained in its own thread keeps
    # every viewer on the newest frame rather than the camera's queued backlog.
    return NewestFrame(source) if source.live else source


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
        reopen = None if source.live else (lambda: _open(spec))
        worker = CameraWorker(spec, source, segmenter, reopen)
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
