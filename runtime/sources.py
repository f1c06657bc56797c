"""Frame sources: camera, video file, image, image folder, stream URL, GStreamer, CSI, synthetic.

``open_source(spec)`` opens *and validates* (reads a first frame) before anything starts, so a
missing camera, an unreadable file or an unknown URL scheme fails at once with a message that
says what to do. Every source yields BGR uint8 frames from ``read()`` and ``None`` at the end.

Live sources (cameras, streams, GStreamer, CSI, live ``test://``) are reopened with exponential
back-off when they drop; file sources skip frames that fail to decode and count them.
"""

from __future__ import annotations

import abc
import contextlib
import glob
import logging
import math
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from .dataset import IMAGE_SUFFIXES, list_images
from .errors import DilsegError
from .pixel_budget import ImageTooLargeError, check_image, check_pixels

log = logging.getLogger("dilseg.sources")

# FFmpeg's own log lines ("[mjpeg @ 0x...] ...", "moov atom not found") would interleave with
# dilseg's messages, which say the same in words (frames skipped and counted, a file that ended
# early). OpenCV reads this once, when its FFmpeg backend first starts; a value set by the user wins.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET

STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp")
SPEC_HELP = (
    "--source takes a camera index (0), a video or image file, a folder of images, "
    "rtsp:// or http(s):// URL, csi://N (Jetson CSI camera), a GStreamer pipeline ending in appsink, "
    "or test:// (synthetic pattern, e.g. test://640x480?fps=30)"
)
# A decode failure followed by readable frames is a corrupt frame; this many failures in a
# row is the end of the file (OpenCV reports both the same way).
MAX_CORRUPT_RUN = 25


# A file played as a camera (``open_source(..., loop=True)``) without a frame rate of its own
# (a still image, a folder) is shown at this rate.
LOOP_FPS = 10.0


class SourceError(DilsegError, RuntimeError):
    """A source cannot be opened or read; the message says what to do."""


class LatestSlot:
    """The one newest-item mailbox: ``put`` replaces what is waiting (counting a drop), ``get``
    takes it. ``end()`` says no more will come (what is waiting is still taken, then ``get``
    returns None); ``close()`` stops at once (what is waiting is discarded, ``get`` returns None).

    Live frames reach inference through one (the pipeline), a single-threaded reader through
    one (NewestFrame), pushed frames through one (PushSource).
    """

    def __init__(self) -> None:
        self._item = None
        self._full = False
        self._ended = False
        self.closed = False
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, item) -> bool:
        """Hand ``item`` over; False (and nothing kept) once the slot is ended or closed."""
        with self._cond:
            if self._ended or self.closed:
                return False
            if self._full:
                self.dropped += 1
            self._item, self._full = item, True
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None):
        """The newest item, or None once ended (and emptied) or closed; raises queue.Empty
        after ``timeout`` seconds without either."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._full or self._ended or self.closed, timeout):
                raise queue.Empty
            if self.closed or not self._full:
                return None
            item, self._item, self._full = self._item, None, False
            return item

    @property
    def waiting(self) -> bool:
        """An item is there for ``get`` to take."""
        return self._full

    @property
    def finished(self) -> bool:
        """Ended or closed: ``put`` takes nothing more."""
        return self._ended or self.closed

    def end(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._item, self._full = None, False
            self._cond.notify_all()


class Pacer:
    """Holds a reader to ``fps`` frames per second, as a camera would: ``wait()`` blocks until
    the next frame is due (True when ``wake`` interrupted it). A late reader gets no burst of
    catch-up frames: the next frame is due one period after the later of schedule and now.
    ``fps`` None or 0 does not wait."""

    def __init__(self, fps: float | None, wake: threading.Event) -> None:
        self.period = 1.0 / fps if fps else 0.0
        self.wake = wake
        self._due = 0.0

    def wait(self) -> bool:
        if self.period:
            now = time.monotonic()
            if self._due > now and self.wake.wait(self._due - now):
                return True
            self._due = max((self._due or now) + self.period, time.monotonic())
        return self.wake.is_set()


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[None]:
    """OpenCV prints its own warnings on failed opens; ours say more, so silence its."""
    try:
        from cv2.utils import logging as cvlog

        old = cvlog.getLogLevel()
        cvlog.setLogLevel(cvlog.LOG_LEVEL_SILENT)
    except (ImportError, AttributeError):  # builds without cv2.utils.logging
        yield
        return
    try:
        yield
    finally:
        cvlog.setLogLevel(old)


def has_gstreamer() -> bool:
    """Whether this OpenCV build can run GStreamer pipelines (PyPI wheels cannot; JetPack's can)."""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.split(":", 1)[1]
    return False


class Source(abc.ABC):
    """Base class: ``read()`` -> BGR uint8 frame or None at the end; ``close()``.

    ``name`` after a read is a stable name for that frame (the file stem for folders, the
    running index otherwise), which sinks use to name their outputs.
    """

    spec: str = ""
    live: bool = False
    fps: float | None = None
    frame_count: int | None = None  # frames in a file source when known (for progress bars)
    corrupt_frames: int = 0
    reopens: int = 0
    lost: bool = False  # a live source that gave up reconnecting
    index: int = -1  # the source's own number of the frame last read
    name: str = ""

    @abc.abstractmethod
    def read(self) -> np.ndarray | None:
        """The next frame, or None at the end (or once interrupted)."""

    def close(self) -> None:
        pass

    def interrupt(self) -> None:
        """Wake a read that waits (pacing, reconnect back-off) so a stop is prompt."""

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[np.ndarray]:
        while (frame := self.read()) is not None:
            yield frame

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, live={self.live}, fps={self.fps})"


# --------------------------------------------------------------------------- images


def _imread(path: Path) -> np.ndarray | None:
    """BGR uint8 image or None when it cannot be decoded (truncated, garbage, unsupported).
    Raises ImageTooLargeError, before decoding, when its header announces more pixels than the
    budget (pixel_budget)."""
    with _quiet_opencv():
        try:
            data = np.fromfile(str(path), np.uint8)
        except OSError:
            return None
        check_image(data.data, str(path))
        frame = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    return frame


def _natural_key(path: Path) -> list:
    """frame2 sorts before frame10, as a person would expect of an image sequence."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


class ImageSource(Source):
    """One image, yielded ``repeat`` times (once by default)."""

    def __init__(self, path: Path, repeat: int = 1) -> None:
        self.spec = str(path)
        self.frame = _imread(path)
        if self.frame is None:
            raise SourceError(f"{path}: cannot decode this image (corrupt, truncated or an unsupported format)")
        self.repeat, self.count = max(1, int(repeat)), 0
        self.frame_count = self.repeat
        self.stem = path.stem

    def read(self) -> np.ndarray | None:
        if self.count >= self.repeat:
            return None
        self.name = self.stem if self.repeat == 1 else f"{self.stem}_{self.count:06d}"
        self.count += 1
        return self.frame.copy()


class FolderSource(Source):
    """Every image in a folder, in natural sort order; undecodable files are skipped and counted."""

    def __init__(self, folder: Path, fps: float | None = None) -> None:
        self.spec = str(folder)
        self.fps = fps
        self.paths = sorted(list_images(folder), key=_natural_key)
        if not self.paths:
            raise SourceError(f"{folder}: no images in this folder (looked for {', '.join(IMAGE_SUFFIXES)})")
        self.frame_count = len(self.paths)
        self.pos = 0
        self.corrupt_paths: list[Path] = []  # the images skipped (their count is corrupt_frames)
        # Validate before anything starts: at least the first image must decode.
        self._first = self._next_readable()
        if self._first is None:
            raise SourceError(f"{folder}: none of its {len(self.paths)} images can be decoded")

    def _next_readable(self) -> np.ndarray | None:
        while self.pos < len(self.paths):
            path = self.paths[self.pos]
            self.pos += 1
            try:
                frame = _imread(path)
                why = "cannot decode (corrupt or truncated)"
            except ImageTooLargeError as exc:  # skipped like an undecodable one, and named
                frame, why = None, str(exc).removeprefix(f"{path}: ")
            if frame is not None:
                self.name = path.stem
                return frame
            self.corrupt_frames += 1
            self.corrupt_paths.append(path)
            log.warning("skipping %s: %s", path, why)
        return None

    def read(self) -> np.ndarray | None:
        if self._first is not None:
            frame, self._first = self._first, None
            return frame
        return self._next_readable()


# --------------------------------------------------------------------------- video files


def read_past_corrupt(source: Source, read: Callable[[], tuple[bool, np.ndarray | None]],
                      position: int, failures: int = 0) -> tuple[np.ndarray | None, int]:
    """The next decodable frame of a file (on disk or over HTTP) and the reads it took. Failures
    followed by a good frame were corrupt frames: skipped, counted in ``source.corrupt_frames``
    and logged; ``MAX_CORRUPT_RUN`` failures in a row are the end of the file (None). ``failures``:
    reads that already failed just before."""
    while True:
        ok, frame = read()
        if ok and frame is not None:
            if failures:
                source.corrupt_frames += failures
                log.warning("%s: skipped %d undecodable frame(s) before frame %d", source.spec, failures,
                            position + failures)
            return frame, failures + 1
        failures += 1
        if failures >= MAX_CORRUPT_RUN:
            return None, failures


class VideoFileSource(Source):
    """A video file read with OpenCV; frames that fail to decode mid-file are skipped and counted."""

    def __init__(self, path: Path) -> None:
        self.spec = str(path)
        with _quiet_opencv():
            self.cap = cv2.VideoCapture(str(path))
        if not self.cap.isOpened():
            raise SourceError(f"{path}: cannot open as a video (corrupt, or a codec this OpenCV build lacks); "
                              "try converting it with `ffmpeg -i IN -c:v libx264 OUT.mp4`")
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and fps > 0 and math.isfinite(fps) else None
        count = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.frame_count = count if count > 0 else None
        self.index = -1
        self.delivered = 0  # decoded frames
        self._ended = False
        self._first = self._read_frame()
        if self._first is None:
            self.cap.release()
            raise SourceError(f"{path}: the video has no decodable frames")

    def _read_frame(self) -> np.ndarray | None:
        def read() -> tuple[bool, np.ndarray | None]:
            with _quiet_opencv():
                return self.cap.read()

        frame, tried = read_past_corrupt(self, read, self.index + 1)
        self.index += tried
        if frame is not None:
            self.name = f"{self.index:06d}"
            self.delivered += 1
        return frame

    def read(self) -> np.ndarray | None:
        if self._first is not None:
            frame, self._first = self._first, None
            return frame
        frame = self._read_frame()
        if frame is None and not self._ended:
            self._ended = True
            seen = self.delivered + self.corrupt_frames
            if self.frame_count and seen < self.frame_count:
                log.warning("%s: the file ended early, after %d of the %d frames its header announces "
                            "(truncated or still being written?)", self.spec, seen, self.frame_count)
        return frame

    def close(self) -> None:
        self.cap.release()


# --------------------------------------------------------------------------- synthetic pattern


class TestPattern:
    """A deterministic moving scene with distinct coloured regions: sky, road, a green verge,
    a red and a blue block moving in opposite directions and a yellow disc. Frame ``i``
    depends on ``i`` only.

    It behaves like a capture device (``isOpened``, ``read() -> (ok, frame)``, ``release``) so
    the live wrapper's drop/reopen logic is the same code a real camera goes through;
    ``drop_every`` makes it "disconnect" every N frames to exercise that path.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, width: int, height: int, drop_every: int = 0, start: int = 0) -> None:
        self.w, self.h = width, height
        self.drop_every = drop_every
        self.index = start
        self.opened = True
        self._resumed_at = start  # a reopened device does not drop again at the frame it resumes on
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        horizon = height * 0.45
        sky = yy < horizon
        fade = 1 - yy / max(horizon, 1)
        road = 90 + 20 * np.sin(xx / 7.0)
        base = np.empty((height, width, 3), np.uint8)
        base[..., 0] = np.where(sky, 200 + 40 * fade, road)
        base[..., 1] = np.where(sky, 150 + 30 * fade, road)
        base[..., 2] = np.where(sky, 90, road)
        base[(yy >= horizon) & (yy < horizon + height * 0.1)] = (40, 160, 60)  # green verge
        self.base = base

    def render(self, i: int) -> np.ndarray:
        w, h = self.w, self.h
        frame = self.base.copy()
        bw, bh = max(4, w // 6), max(4, h // 5)
        x1 = (i * 4) % (w + bw) - bw
        x2 = w - (i * 3) % (w + bw)
        y1, y2 = int(h * 0.55), int(h * 0.72)
        cv2.rectangle(frame, (x1, y1), (x1 + bw, y1 + bh), (40, 40, 220), -1)  # red block (BGR)
        cv2.rectangle(frame, (x2, y2), (x2 + bw, min(h - 1, y2 + bh)), (200, 80, 20), -1)  # blue block
        cx = int(w / 2 + w / 4 * math.sin(i / 15.0))
        cv2.circle(frame, (cx, int(h * 0.2)), max(3, h // 12), (0, 220, 255), -1)
        cv2.putText(frame, str(i), (4, h - 6), cv2.FONT_HERSHEY_SIMPLEX, max(0.3, h / 480), (255, 255, 255), 1)
        return frame

    def isOpened(self) -> bool:  # noqa: N802 - mirrors cv2.VideoCapture
        return self.opened

    def read(self) -> tuple[bool, np.ndarray | None]:
        if not self.opened:
            return False, None
        if self.drop_every and self.index % self.drop_every == 0 and self.index != self._resumed_at:
            self.opened = False  # the "cable" is pulled; a reopen resumes at this frame
            return False, None
        frame = self.render(self.index)
        self.index += 1
        return True, frame

    def release(self) -> None:
        self.opened = False


def test_frame(i: int, width: int = 640, height: int = 480) -> np.ndarray:
    """Frame ``i`` of ``test://WIDTHxHEIGHT``."""
    return TestPattern(width, height).render(i)


test_frame.__test__ = False  # type: ignore[attr-defined]


def parse_test_spec(spec: str) -> dict:
    """``test://[WxH][?fps=F&frames=N&live=0|1&drop_every=N]`` -> options."""
    parts = urlsplit(spec)
    size = (parts.netloc + parts.path).strip("/")
    w, h = 640, 480
    if size:
        m = re.fullmatch(r"(\d+)x(\d+)", size)
        if not m or int(m.group(1)) < 8 or int(m.group(2)) < 8:
            raise SourceError(f"{spec}: the size must look like WxH with both >= 8, e.g. test://640x480")
        w, h = int(m.group(1)), int(m.group(2))
        check_pixels(w, h, spec)  # the pattern is drawn at full size: 30000x30000 would take gigabytes
    opts: dict = {"width": w, "height": h}
    known = {"fps": float, "frames": int, "live": int, "drop_every": int}
    for key, values in parse_qs(parts.query, keep_blank_values=True).items():
        if key not in known:
            raise SourceError(f"{spec}: unknown option {key!r}; test:// takes {', '.join(known)}")
        try:
            opts[key] = known[key](values[-1])
        except ValueError:
            raise SourceError(f"{spec}: option {key}={values[-1]!r} is not a number") from None
    if opts.get("frames") is not None and opts["frames"] < 1:
        raise SourceError(f"{spec}: frames must be >= 1")
    if opts.get("fps", 0) < 0:
        raise SourceError(f"{spec}: fps must be >= 0 (0 = unpaced)")
    return opts


class SyntheticSource(Source):
    """``test://`` with ``frames=N`` or ``live=0``: a file-like source, every frame in order,
    unpaced unless ``fps`` is given. (Live ``test://`` is a LiveSource around a TestPattern.)"""

    def __init__(self, spec: str, width: int, height: int, fps: float | None, total: int | None) -> None:
        self.spec, self.fps, self.total, self.frame_count = spec, fps, total, total
        self.pattern = TestPattern(width, height)
        self.index = -1
        self._wake = threading.Event()
        self._pacer = Pacer(fps, self._wake)

    def read(self) -> np.ndarray | None:
        if self._wake.is_set() or (self.total is not None and self.index + 1 >= self.total):
            return None
        if self._pacer.wait():
            return None
        self.index += 1
        self.name = f"{self.index:06d}"
        return self.pattern.render(self.index)

    def interrupt(self) -> None:
        self._wake.set()


# --------------------------------------------------------------------------- live capture


class LiveSource(Source):
    """A live device or stream: paced by the device, reopened with exponential back-off on drops.

    ``opener`` returns an object shaped like ``cv2.VideoCapture`` (``isOpened``, ``read``,
    ``release``); ``describe_failure`` (or a function returning it, called only on failure) is the
    error when it does not open, ``no_frame`` when it opens but its first read fails. A drop (read fails) closes it and retries ``opener`` after ``reopen_delay``
    seconds, doubling up to ``reopen_max_delay``, at most ``reopen_attempts`` times in a row;
    each successful reopen is logged and counted in ``reopens``.
    """

    live = True

    def __init__(self, spec: str, opener: Callable[[], object], describe_failure: str | Callable[[], str],
                 fps: float | None = None,
                 reopen_delay: float = 0.5, reopen_max_delay: float = 8.0, reopen_attempts: int = 10,
                 pace: float | None = None, no_frame: str | None = None) -> None:
        self.spec = spec
        self.opener = opener
        self.fps = fps
        self.reopen_delay, self.reopen_max_delay, self.reopen_attempts = reopen_delay, reopen_max_delay, reopen_attempts
        self.index = -1
        self.lost = False  # gave up reconnecting
        self._wake = threading.Event()
        # Devices that do not pace themselves (synthetic) are paced here.
        self._pacer = Pacer(1.0 / pace if pace else None, self._wake)
        self.cap = self._try_open()
        if self.cap is None:
            raise SourceError(describe_failure() if callable(describe_failure) else describe_failure)
        ok, frame = self._cap_read()
        if not ok:
            self.cap.release()
            raise SourceError(no_frame or f"{spec}: it opened, but no frame came from it")
        self._first = frame

    def _try_open(self):
        with _quiet_opencv():
            try:
                cap = self.opener()
            except cv2.error:
                return None
        if cap is None or not cap.isOpened():
            if cap is not None:
                cap.release()
            return None
        return cap

    def _cap_read(self) -> tuple[bool, np.ndarray | None]:
        with _quiet_opencv():
            try:
                ok, frame = self.cap.read()
            except cv2.error:
                return False, None
        return bool(ok) and frame is not None, frame

    def _wait(self, seconds: float) -> bool:
        """Sleep unless interrupted; True when interrupted."""
        return self._wake.wait(seconds) if seconds > 0 else self._wake.is_set()

    def _reconnect(self) -> bool:
        self.cap.release()
        delay = self.reopen_delay
        started = time.monotonic()
        for attempt in range(1, self.reopen_attempts + 1):
            log.warning("%s: source dropped; reopening in %.2fs (attempt %d/%d)", self.spec, delay, attempt,
                        self.reopen_attempts)
            if self._wait(delay):
                return False
            cap = self._try_open()
            if cap is not None:
                self.cap = cap
                self.reopens += 1
                log.warning("%s: reopened after %.2fs (reopen #%d)", self.spec, time.monotonic() - started, self.reopens)
                return True
            delay = min(delay * 2, self.reopen_max_delay)
        log.error("%s: gave up after %d reopen attempts", self.spec, self.reopen_attempts)
        self.lost = True
        return False

    def read(self) -> np.ndarray | None:
        if self._pacer.wait():
            return None
        if self._first is not None:
            frame, self._first = self._first, None
        else:
            while True:
                if self._wake.is_set():
                    return None
                ok, frame = self._cap_read()
                if ok:
                    break
                if not self.live:  # a file over HTTP: corrupt frames skipped and counted, as from disk
                    frame, _ = read_past_corrupt(self, self._cap_read, self.index + 1, failures=1)
                    if frame is None:
                        return None
                    break
                if not self._reconnect():
                    return None
        self.index += 1
        self.name = f"{self.index:06d}"
        return frame

    def interrupt(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._wake.set()
        if self.cap is not None:
            self.cap.release()


class NewestFrame(Source):
    """A live source drained by its own thread: ``read()`` returns the newest frame not yet
    returned, so a consumer slower than the camera shows the present, not the backlog that
    OpenCV and the driver queue (several frames on V4L2). Frames passed over are counted in
    ``dropped``. Once ``interrupt()`` or ``close()`` is called, ``read()`` returns None, never
    a frame still waiting. The pipeline's capture thread does the same; this is for a
    single-threaded loop (``for frame in NewestFrame(open_source("0")): ...``)."""

    live = True

    def __init__(self, source: Source) -> None:
        self.source = source
        self.spec, self.fps = source.spec, source.fps
        self.index = -1
        self._slot = LatestSlot()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name=f"dilseg-grab-{source.spec}", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        try:
            while (frame := self.source.read()) is not None:
                if not self._slot.put((frame, self.source.name, self.source.index)):
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            self._error = exc
        finally:
            self._slot.end()

    def read(self) -> np.ndarray | None:
        item = self._slot.get()
        if item is None:
            if self._error is not None and not self._slot.closed:
                raise self._error
            return None
        frame, self.name, self.index = item
        return frame

    @property
    def dropped(self) -> int:
        return self._slot.dropped

    @property
    def corrupt_frames(self) -> int:  # type: ignore[override]
        return self.source.corrupt_frames

    @property
    def reopens(self) -> int:  # type: ignore[override]
        return self.source.reopens

    @property
    def lost(self) -> bool:  # type: ignore[override]
        return self.source.lost

    def interrupt(self) -> None:
        self._slot.close()
        self.source.interrupt()

    def close(self) -> None:
        self.interrupt()
        self._thread.join(timeout=5.0)
        self.source.close()


class PushSource(Source):
    """Frames handed over by someone else's thread (a WebRTC callback, a ROS subscriber):
    ``push(item)`` never blocks and keeps only the newest; ``read()`` returns it, converted by
    ``convert`` in the reader's thread, or None once ``close()`` is called or nothing was
    pushed for ``idle_s`` seconds (the producer went away)."""

    live = True

    def __init__(self, spec: str = "push://", convert: Callable[[object], np.ndarray] | None = None,
                 idle_s: float = 5.0) -> None:
        self.spec, self.convert, self.idle_s = spec, convert, idle_s
        self.index = -1
        self._slot = LatestSlot()

    def push(self, item) -> bool:
        """Hand a frame over; False once the source has ended (a new one is needed)."""
        return self._slot.put(item)

    def read(self) -> np.ndarray | None:
        try:
            item = self._slot.get(timeout=self.idle_s)
        except queue.Empty:
            item = None
        if item is None:
            self._slot.end()
            return None
        self.index += 1
        self.name = f"{self.index:06d}"
        return self.convert(item) if self.convert is not None else item

    @property
    def ended(self) -> bool:
        return self._slot.finished

    @property
    def dropped(self) -> int:
        return self._slot.dropped

    def interrupt(self) -> None:
        self._slot.close()

    def close(self) -> None:
        self._slot.close()


class LoopingSource(Source):
    """A file, image or folder played as a camera: paced at its own frame rate (``LOOP_FPS``
    when it has none) and started again from the beginning at its end. It is live, so a
    consumer keeps only the newest frame, as from a camera. ``opener`` reopens the file."""

    live = True

    def __init__(self, first: Source, opener: Callable[[], Source]) -> None:
        self.source, self.opener = first, opener
        self.spec = first.spec
        self.fps = first.fps or LOOP_FPS
        self.index = -1
        self.loops = 0
        self._corrupt_before = 0  # corrupt frames of the passes already played
        self._wake = threading.Event()
        self._pacer = Pacer(self.fps, self._wake)

    def read(self) -> np.ndarray | None:
        if self._pacer.wait():
            return None
        frame = self.source.read()
        if frame is None and not self._wake.is_set():
            self._corrupt_before += self.source.corrupt_frames
            self.source.close()
            self.source = self.opener()
            self.loops += 1
            frame = self.source.read()
        if frame is None:
            return None
        self.index += 1
        self.name = self.source.name
        return frame

    @property
    def corrupt_frames(self) -> int:  # type: ignore[override]
        return self._corrupt_before + self.source.corrupt_frames

    def interrupt(self) -> None:
        self._wake.set()
        self.source.interrupt()

    def close(self) -> None:
        self.interrupt()
        self.source.close()


# --------------------------------------------------------------------------- opening


def _camera_failure(index: int) -> str:
    present = sorted(glob.glob("/dev/video*"))
    found = f"video devices present: {', '.join(present)}" if present else "no /dev/video* devices are present"
    return (f"no camera at index {index} ({found}); check it is connected and not used by another program, "
            f"or pick another index, e.g. --source 0")


def _capture(target, api: int = cv2.CAP_ANY, params: list[int] | None = None):
    def opener():
        return cv2.VideoCapture(target, api, params) if params else cv2.VideoCapture(target, api)

    return opener


def _camera_opener(index: int, width: int | None, height: int | None, fps: float | None):
    def opener():
        cap = cv2.VideoCapture(index)
        if cap.isOpened():
            if width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            if height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
            if fps:
                cap.set(cv2.CAP_PROP_FPS, fps)
            # Keep the driver's queue short: latency first.
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        return cap

    return opener


def csi_pipeline(sensor: int, width: int = 1280, height: int = 720, fps: float = 30, flip: int = 0) -> str:
    """The usual Jetson CSI pipeline: nvarguscamerasrc -> NVMM -> BGR appsink (drop old buffers)."""
    return (
        f"nvarguscamerasrc sensor-id={sensor} ! "
        f"video/x-raw(memory:NVMM), width=(int){width}, height=(int){height}, framerate=(fraction){int(fps)}/1 ! "
        f"nvvidconv flip-method={flip} ! video/x-raw, format=(string)BGRx ! videoconvert ! "
        "video/x-raw, format=(string)BGR ! appsink drop=true max-buffers=1 sync=false"
    )


def _is_gstreamer(spec: str) -> bool:
    if "!" not in spec:
        return False
    last = spec.rsplit("!", 1)[1].strip()
    return last.split(" ", 1)[0].split(",", 1)[0] == "appsink"


def _need_gstreamer(what: str) -> None:
    if not has_gstreamer():
        raise SourceError(
            f"{what} needs OpenCV built with GStreamer, and this one is not (cv2.getBuildInformation() shows "
            "'GStreamer: NO'; PyPI's opencv wheels never have it). On a Jetson use JetPack's OpenCV: "
            "`pip uninstall opencv-python opencv-python-headless` inside a venv made with --system-site-packages"
        )


def _open_test(text: str, opts: dict, reopen: dict) -> Source:
    o = {**parse_test_spec(text), **{k: v for k, v in opts.items() if k in ("fps", "frames", "live", "drop_every")}}
    total = o.get("frames")
    live = bool(o.get("live", total is None))
    fps = o.get("fps", 30.0 if live else 0.0) or None
    if not live:
        return SyntheticSource(text, o["width"], o["height"], fps, total)
    device: list[TestPattern] = []

    def open_pattern() -> TestPattern:
        # A reopened synthetic camera resumes where the dropped one stopped.
        start = device[-1].index if device else 0
        device[:] = [TestPattern(o["width"], o["height"], o.get("drop_every", 0), start)]
        return device[0]

    return LiveSource(text, open_pattern, f"{text}: cannot start the test pattern", fps=fps,
                      pace=1.0 / fps if fps else None, **reopen)


def open_source(spec: str | int, **opts) -> Source:
    """Open and validate a source; raises SourceError saying what to do when it cannot.

    Options: ``repeat`` (single image), ``fps`` (folder pacing, camera request), ``width``/``height``
    (camera/CSI request), ``reopen_delay``/``reopen_max_delay``/``reopen_attempts`` (live sources),
    ``live`` (force stream URLs live or not), ``timeout_ms`` (stream open/read timeout),
    ``loop`` (a file, image or folder is played as a camera: paced, from the start again at
    its end; see LoopingSource).
    """
    if opts.pop("loop", False):
        first = open_source(spec, **opts)
        if first.live:
            return first
        return LoopingSource(first, lambda: open_source(spec, **opts))
    reopen = {k: opts.pop(k) for k in ("reopen_delay", "reopen_max_delay", "reopen_attempts") if k in opts}
    text = str(spec).strip()
    if not text:
        raise SourceError(f"empty source; {SPEC_HELP}")

    if isinstance(spec, int) or re.fullmatch(r"\d+", text):
        index = int(text)
        return LiveSource(text, _camera_opener(index, opts.get("width"), opts.get("height"), opts.get("fps")),
                          _camera_failure(index), fps=opts.get("fps"),
                          no_frame=f"camera {index} opened but delivered no frame; another program may hold it, "
                                   "or it needs another resolution (--source with a GStreamer pipeline)", **reopen)

    if _is_gstreamer(text):
        _need_gstreamer("a GStreamer pipeline source")
        return LiveSource(text, _capture(text, cv2.CAP_GSTREAMER),
                          f"GStreamer could not start the pipeline {text!r}; test it with `gst-launch-1.0` "
                          "(replacing appsink by fakesink)", **reopen)
    if "!" in text and "://" not in text:
        raise SourceError(f"{text!r} looks like a GStreamer pipeline but does not end in appsink; "
                          "end it with `! appsink` so OpenCV can take the frames")

    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    if scheme == "test":
        return _open_test(text, opts, reopen)
    if scheme == "csi":
        m = re.fullmatch(r"csi://(\d+)", text)
        if not m:
            raise SourceError(f"{text!r}: write a CSI camera as csi://N, N being the sensor id (csi://0)")
        _need_gstreamer(f"the CSI camera {text}")
        fps = opts.get("fps") or 30
        pipeline = csi_pipeline(int(m.group(1)), opts.get("width") or 1280, opts.get("height") or 720, fps)
        return LiveSource(text, _capture(pipeline, cv2.CAP_GSTREAMER),
                          f"{text}: the CSI camera did not start; check `nvgstcapture-1.0 --sensor-id={m.group(1)}` "
                          "works and that nvargus-daemon is running (`sudo systemctl restart nvargus-daemon`)",
                          fps=float(fps), **reopen)
    if scheme in STREAM_SCHEMES:
        timeout = int(opts.get("timeout_ms", 10000))
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout]

        def failure() -> str:
            from .stream_probe import why_not_open

            why = why_not_open(text, timeout=min(3.0, timeout / 1000))
            if why is None:
                return (f"{text}: cannot open the stream within {timeout / 1000:.0f}s; check the URL, the network "
                        "and credentials (try it with `ffplay URL`)")
            return f"{text}: cannot open the stream: {why}; check the URL (try it with `ffplay URL`)"

        no_frame = (f"{text}: connected, but no frame could be read from it (none arrived within "
                    f"{timeout / 1000:.0f}s, or none decoded); check the stream plays with `ffplay URL`")
        src = LiveSource(text, _capture(text, cv2.CAP_FFMPEG, params), failure, no_frame=no_frame, **reopen)
        fps = src.cap.get(cv2.CAP_PROP_FPS)
        src.fps = float(fps) if fps and 0 < fps < 1000 else None
        count = src.cap.get(cv2.CAP_PROP_FRAME_COUNT)
        # A plain video file over HTTP has a frame count: treat it like a file unless told otherwise.
        src.live = bool(opts.get("live", scheme not in ("http", "https") or not count or count <= 0))
        return src
    if scheme:
        raise SourceError(f"unknown source scheme {scheme}:// in {text!r}; {SPEC_HELP}")

    path = Path(text).expanduser()
    if path.is_dir():
        return FolderSource(path, fps=opts.get("fps"))
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder; {SPEC_HELP}")
    if not os.access(path, os.R_OK):
        raise SourceError(f"{path}: permission denied; make the file readable")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageSource(path, repeat=opts.get("repeat", 1))
    return VideoFileSource(path)
