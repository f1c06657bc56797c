"""Frame sinks: window, video file, folder of overlays, folder of label PNGs, none.

Every sink takes ``write(frame, labels, rendered, name=None)`` (the source frame, the HxW
uint8 class ids at frame size, the rendered picture) and ``close()``; the pipeline calls
``write_result(result)``, which a sink needing more of the FrameResult (its metadata, its
frame number) overrides. Files are complete or absent: a video is written under a temporary
name and renamed on ``close()``; every image is written to a temporary file and renamed.
``abort()`` discards an unfinished video.
"""

from __future__ import annotations

import abc
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import cv2
import numpy as np

from .errors import DilsegError
from .files import UMASK, atomic_write_bytes
from .video_check import GrowthWatch, unreadable_reason

if TYPE_CHECKING:
    from .pipeline import FrameResult

VIDEO_FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "mp4v"}
SINK_HELP = ("sinks are: window, none, a video file (.mp4 .m4v .mov .avi .mkv), overlays:DIR (rendered images) "
             "or labels:DIR (class-id PNGs)")


class SinkError(DilsegError, RuntimeError):
    """A sink cannot be opened or written; the message says what to do."""


class Sink:
    """Base sink: does nothing. ``quit_requested`` lets a sink (a window) ask the pipeline to stop."""

    spec = "none"
    quit_requested = False

    def write(self, frame: np.ndarray, labels: np.ndarray, rendered: np.ndarray, name: str | None = None) -> None:
        pass

    def write_result(self, result: "FrameResult") -> None:
        """What the pipeline calls per frame. A sink that draws pictures itself adds its drawing
        time to ``result.timings["render"]``; the pipeline counts the rest as ``write``."""
        self.write(result.frame, result.labels, result.rendered, name=result.name)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        """Stop after an error: discard anything that is not complete."""
        self.close()

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.abort() if exc_type else self.close()


class LatestSink(Sink):
    """Keeps the newest result for readers in other threads (a web page, a UI loop):
    ``latest()`` returns it, ``seq`` counts results, and every ``subscribe``d listener is
    called (from the pipeline's output thread) after each one and once more on ``close()``.
    Subclasses publish something else by overriding ``prepare``."""

    spec = "latest"

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._latest = None
        self.seq = 0
        self.closed = False
        self._listeners: list[Callable[[], None]] = []

    def prepare(self, result: "FrameResult"):
        """What readers get for a result (the result itself here)."""
        return result

    def write_result(self, result: "FrameResult") -> None:
        item = self.prepare(result)
        with self._cond:
            self._latest = item
            self.seq += 1
            self._cond.notify_all()
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def latest(self):
        with self._cond:
            return self._latest

    def subscribe(self, listener: Callable[[], None]) -> None:
        with self._cond:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        with self._cond:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
            listeners = list(self._listeners)
        for listener in listeners:
            listener()


def _writable_dir(folder: Path, what: str) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SinkError(f"{folder}: cannot create the {what} folder ({exc.strerror}); choose a writable path") from None
    if not folder.is_dir():
        raise SinkError(f"{folder}: exists and is not a folder; choose another {what} folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SinkError(f"{folder}: permission denied; choose a writable {what} folder")
    return folder


def _temp_beside(path: Path, suffix: str) -> tuple[int, str]:
    """A hidden temporary file in the same folder (so the final rename is atomic), with the
    permissions a plain open() would give rather than mkstemp's 0600."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~UMASK)
    return fd, tmp


def _write_image_atomic(path: Path, image: np.ndarray, params: list[int] | None = None) -> None:
    """Encode then write to a temporary file in the same folder and rename: complete or absent."""
    ok, data = cv2.imencode(path.suffix, image, params or [])
    if not ok:
        raise SinkError(f"{path}: OpenCV cannot encode a {path.suffix} image")
    atomic_write_bytes(path, data.tobytes())


class FolderSink(Sink, abc.ABC):
    """One image per frame, named after the frame (``name``) or its running number."""

    kind = "images"

    def __init__(self, folder: str | Path, ext: str, params: list[int] | None = None) -> None:
        self.folder = _writable_dir(Path(folder), self.kind)
        self.spec = f"{self.kind}:{self.folder}"
        self.ext, self.params = ext, params
        self.count = 0

    @abc.abstractmethod
    def image(self, frame: np.ndarray, labels: np.ndarray, rendered: np.ndarray) -> np.ndarray:
        """The picture this folder keeps for a frame."""

    def write(self, frame: np.ndarray, labels: np.ndarray, rendered: np.ndarray, name: str | None = None) -> None:
        stem = name if name else f"{self.count:06d}"
        try:
            _write_image_atomic(self.folder / f"{stem}{self.ext}", self.image(frame, labels, rendered), self.params)
        except OSError as exc:
            # OutputError (atomic_write's) names the file and the cause already.
            raise SinkError(f"{self.folder}: cannot write {stem}{self.ext} ({exc.strerror})" if exc.strerror
                            else str(exc)) from None
        self.count += 1


class OverlayFolderSink(FolderSink):
    """The rendered pictures (overlay, mask or side-by-side) as JPEG (default) or PNG."""

    kind = "overlays"

    def __init__(self, folder: str | Path, ext: str = ".jpg", quality: int = 92) -> None:
        ext = ext if ext.startswith(".") else "." + ext
        if ext.lower() not in (".jpg", ".jpeg", ".png", ".bmp", ".webp"):
            raise SinkError(f"overlay images can be .jpg, .png, .bmp or .webp, not {ext}")
        super().__init__(folder, ext, [cv2.IMWRITE_JPEG_QUALITY, quality] if ext.lower() in (".jpg", ".jpeg") else None)

    def image(self, frame, labels, rendered):
        return rendered


class LabelFolderSink(FolderSink):
    """The class ids as 8-bit single-channel PNGs (lossless), the layout datasets use."""

    kind = "labels"

    def __init__(self, folder: str | Path) -> None:
        super().__init__(folder, ".png", [cv2.IMWRITE_PNG_COMPRESSION, 1])  # fast; PNG is lossless anyway

    def image(self, frame, labels, rendered):
        if labels.dtype != np.uint8 or labels.ndim != 2:
            raise SinkError(f"labels must be HxW uint8 class ids, got {labels.dtype} {labels.shape}")
        return labels


class VideoSink(Sink):
    """A video file, written under a hidden temporary name beside it and renamed on ``close()``.

    The writer opens on the first frame (its size is the video's size; later frames of another
    size are resized to it). A run that wrote no frame leaves no file.
    """

    def __init__(self, path: str | Path, fps: float | None = None, fourcc: str | None = None) -> None:
        self.path = Path(path)
        self.spec = str(self.path)
        suffix = self.path.suffix.lower()
        if suffix not in VIDEO_FOURCC:
            raise SinkError(f"{self.path}: unknown video extension {suffix or '(none)'}; use one of "
                            f"{', '.join(VIDEO_FOURCC)}")
        self.fourcc = fourcc or VIDEO_FOURCC[suffix]
        self.fps = float(fps) if fps and fps > 0 else 30.0
        parent = self.path.parent
        if not parent.is_dir():
            raise SinkError(f"{self.path}: the folder {parent} does not exist; create it first")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise SinkError(f"{self.path}: permission denied writing in {parent}")
        if self.path.is_dir():
            raise SinkError(f"{self.path}: is a folder; give a video file name such as out.mp4")
        # Same folder (rename is atomic there) and the same extension (OpenCV picks the container by it).
        fd, tmp = _temp_beside(self.path, f".partial{self.path.suffix}")
        os.close(fd)
        self.tmp = Path(tmp)
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None
        self.count = 0
        self.closed = False

    def _open(self, frame: np.ndarray) -> None:
        h, w = frame.shape[:2]
        self.size = (w, h)
        self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*self.fourcc), self.fps, self.size)
        if not self.writer.isOpened():
            self.abort()
            if "FFMPEG: YES" in " ".join(cv2.getBuildInformation().split()):
                raise SinkError(f"{self.path}: OpenCV's {self.fourcc} encoder refused {w}x{h} frames (too small or "
                                "an unusual size for it); write an .avi (MJPG) instead, or use a larger source")
            raise SinkError(f"{self.path}: OpenCV cannot write {self.fourcc} video here; try another extension "
                            "(.avi writes MJPG) or install an OpenCV build with FFMPEG")
        self.watch = GrowthWatch(self.tmp)

    def write(self, frame: np.ndarray, labels: np.ndarray, rendered: np.ndarray, name: str | None = None) -> None:
        if self.closed:
            raise SinkError(f"{self.path}: write after close")
        if self.writer is None:
            self._open(rendered)
        if (rendered.shape[1], rendered.shape[0]) != self.size:
            rendered = cv2.resize(rendered, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(np.ascontiguousarray(rendered))
        self.count += 1
        # cv2.VideoWriter only logs a failed write: a file that stopped growing on a full disk is one.
        failing = self.watch.check(self.count)
        if failing:
            self.abort()
            raise SinkError(f"{self.path}: cannot write the video: {failing}; nothing was written"
                            + (" (the file already there is kept)" if self.path.exists() else ""))

    def close(self) -> None:
        """Finish the container (index, headers), read it back, and only then move it into place:
        a video that does not hold every frame written (a full disk) replaces nothing."""
        if self.closed:
            return
        self.closed = True
        if self.writer is not None:
            self.writer.release()
        if not self.count:
            self.tmp.unlink(missing_ok=True)
            return
        broken = unreadable_reason(self.tmp, self.count)
        if broken:
            self.tmp.unlink(missing_ok=True)
            raise SinkError(f"{self.path}: cannot write the video: {broken}; nothing was written"
                            + (" (the file already there is kept)" if self.path.exists() else ""))
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.writer is not None:
            self.writer.release()
        self.tmp.unlink(missing_ok=True)


def gui_available() -> tuple[bool, str]:
    """Whether cv2.imshow can work here, and why not."""
    gui = ""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GUI:"):
            gui = line.split(":", 1)[1].strip()
            break
    if gui.upper() == "NONE":
        return False, ("this OpenCV has no GUI support (opencv-python-headless); "
                       "`pip install opencv-python` for windows, or write a video with --output instead")
    if os.name == "posix" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) \
            and not os.uname().sysname == "Darwin":
        return False, "no display (DISPLAY is not set); run it on a desktop session, or write a video with --output"
    return True, ""


class WindowSink(Sink):
    """An OpenCV window; q or Esc (or closing the window) asks the pipeline to stop.

    The window is created on the first write, from the thread that writes: HighGUI wants one
    thread to own its windows.
    """

    def __init__(self, title: str = "dilseg") -> None:
        ok, why = gui_available()
        if not ok:
            raise SinkError(f"cannot show a window: {why}")
        self.title = title
        self.spec = f"window:{title}"
        self.created = False

    def write(self, frame: np.ndarray, labels: np.ndarray, rendered: np.ndarray, name: str | None = None) -> None:
        try:
            if not self.created:
                cv2.namedWindow(self.title, cv2.WINDOW_NORMAL)
                self.created = True
            elif cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1:
                self.quit_requested = True  # the user closed the window
                return
            cv2.imshow(self.title, rendered)
            key = cv2.waitKey(1) & 0xFF
        except cv2.error as exc:
            raise SinkError(f"cannot show a window: {str(exc).strip().splitlines()[-1]}") from None
        if key in (ord("q"), 27):
            self.quit_requested = True

    def close(self) -> None:
        if self.created:
            try:
                cv2.destroyWindow(self.title)
                cv2.waitKey(1)
            except cv2.error:
                pass
            self.created = False


def open_sink(spec: str, **opts) -> Sink:
    """``window[:TITLE]``, ``none``, ``FILE.mp4`` (or ``video:FILE``), ``overlays:DIR``, ``labels:DIR``.

    Options: ``fps`` and ``fourcc`` (video), ``ext`` and ``quality`` (overlays), ``title`` (window).
    """
    text = str(spec).strip()
    kind, _, rest = text.partition(":")
    kind = kind.lower()
    if text.lower() == "none":
        return Sink()
    if kind == "window":
        return WindowSink(rest or opts.get("title", "dilseg"))
    if kind == "overlays" and rest:
        return OverlayFolderSink(rest, ext=opts.get("ext", ".jpg"), quality=opts.get("quality", 92))
    if kind == "labels" and rest:
        return LabelFolderSink(rest)
    if kind == "video" and rest:
        return VideoSink(rest, fps=opts.get("fps"), fourcc=opts.get("fourcc"))
    if Path(text).suffix.lower() in VIDEO_FOURCC:
        return VideoSink(text, fps=opts.get("fps"), fourcc=opts.get("fourcc"))
    raise SinkError(f"unknown sink {text!r}; {SINK_HELP}")
