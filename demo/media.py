"""Uploaded images and videos: decode, segment, render, encode for download.

Kept free of Streamlit so the page stays a thin layer and these run (and fail) the same
way from a test.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from dilseg.runtime.dataset import IMAGE_SUFFIXES
from dilseg.runtime.errors import DilsegError, os_errors_as
from dilseg.runtime.pipeline import Pipeline
from dilseg.runtime.pixel_budget import ImageTooLargeError, check_image
from dilseg.runtime.postprocess import class_areas, colorize, palette_bgr
from dilseg.runtime.segmenter import Segmenter
from dilseg.runtime.sinks import Sink, SinkError
from dilseg.runtime.sources import SourceError, VideoFileSource
from dilseg.runtime.video_check import unreadable_reason
from dilseg.runtime.view import ViewSettings

IMAGE_TYPES = [s.lstrip(".") for s in IMAGE_SUFFIXES]  # what the upload widget accepts: what OpenCV decodes
VIDEO_TYPES = ["mp4", "avi", "mov", "mkv", "webm", "m4v", "mpg", "mpeg"]


class MediaError(DilsegError, ValueError):
    """An upload cannot be decoded; the message names the file and says what would work."""


@dataclass
class ImageResult:
    picture: np.ndarray  # BGR, as the chosen view draws it
    labels: np.ndarray  # HxW uint8 class ids
    areas: np.ndarray  # % of the image per class
    timings: dict[str, float]
    picture_png: bytes
    mask_png: bytes  # colour mask (RGB PNG), hidden classes black
    labels_png: bytes  # single-channel PNG, pixel value = class id


def png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:  # pragma: no cover - OpenCV writes any uint8 image as PNG
        raise MediaError("PNG encoding failed")
    return buf.tobytes()


def decode_image(name: str, data: bytes) -> np.ndarray:
    """Uploaded bytes -> BGR uint8 image, or a MediaError that says why not. An image whose header
    announces more pixels than the budget is refused before decoding (a decompression bomb
    would otherwise take the server, and every viewer's page, down)."""
    try:
        check_image(data, f"`{name}`")
    except ImageTooLargeError as exc:
        raise MediaError(str(exc)) from None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise MediaError(f"`{name}` is not an image this demo can read. "
                         f"Upload a {', '.join(t.upper() for t in IMAGE_TYPES[:4])} or WebP picture.")
    return image


def segment_image(image: np.ndarray, segmenter: Segmenter, settings: ViewSettings) -> ImageResult:
    meta = segmenter.meta
    seg = segmenter.process(image)
    picture = segmenter.render(seg, settings)
    mask = colorize(seg.labels, palette_bgr(meta, settings.visible_list))
    return ImageResult(picture, seg.labels, class_areas(seg.labels, meta.num_classes), seg.timings,
                       png(picture), png(mask), png(seg.labels))


@dataclass
class VideoResult:
    path: Path  # H.264 MP4 of the rendered frames
    frames: int
    fps: float
    areas: np.ndarray  # mean % per class over the video
    seconds: float
    skipped: int = 0  # frames that could not be decoded (corrupt), left out and counted


def _even(n: int) -> int:
    return n - n % 2


class Mp4Sink(Sink):
    """Rendered frames -> an H.264 MP4 that browsers play inline, written under a temporary name,
    read back and only then renamed by ``close()``: complete or absent, as the CLI's VideoSink."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path, self.fps = path, fps
        self.spec = str(path)
        self.tmp = path.with_name(f".{path.name}.part")
        self.count = 0
        self._container = self._stream = None
        self._size = (0, 0)

    def write(self, frame: np.ndarray, labels: np.ndarray, rendered: np.ndarray, name: str | None = None) -> None:
        with os_errors_as(SinkError, self.path, "write the segmented video"):  # a full disk, a removed folder
            self._write(rendered)

    def _write(self, rendered: np.ndarray) -> None:
        import av

        if self._container is None:
            self._container = av.open(str(self.tmp), mode="w", format="mp4", options={"movflags": "+faststart"})
            # yuv420p needs even sizes; one pixel off the edge is not worth a resize.
            self._size = (_even(rendered.shape[0]), _even(rendered.shape[1]))
            self._stream = self._container.add_stream("libx264", rate=round(self.fps))
            self._stream.height, self._stream.width = self._size
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"preset": "veryfast", "crf": "23"}
        h, w = self._size
        if rendered.shape[:2] != (h, w):
            rendered = cv2.resize(rendered, (w, h), interpolation=cv2.INTER_AREA)  # a frame of another size
        out = av.VideoFrame.from_ndarray(np.ascontiguousarray(rendered[:h, :w]), format="bgr24")
        for packet in self._stream.encode(out):
            self._container.mux(packet)
        self.count += 1

    def close(self) -> None:
        if self._container is None:
            return
        try:
            with os_errors_as(SinkError, self.path, "write the segmented video"):
                for packet in self._stream.encode():
                    self._container.mux(packet)
                self._container.close()
        except BaseException:  # a failed flush (full disk) leaves no partial file behind either
            self.abort()
            raise
        self._container = None
        # A closed container is not yet a video: the file under the temporary name may have been
        # cut short or replaced while it was written; what it holds is what the page would offer.
        broken = unreadable_reason(self.tmp, self.count)
        if broken:
            self.tmp.unlink(missing_ok=True)
            raise SinkError(f"{self.path}: cannot write the segmented video: {broken}; nothing was written")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - discarding it anyway
                pass
            self._container = None
        self.tmp.unlink(missing_ok=True)


def segment_video(source: Path, segmenter: Segmenter, settings: ViewSettings,
                  progress: Callable[[int, int], None] | None = None, out_dir: Path | None = None,
                  name: str | None = None) -> VideoResult:
    """Every frame in order -> rendered H.264 MP4 (browsers play it inline), through the same
    Pipeline as `dilseg run` with a file's policy: no frame lost, frames that cannot be decoded
    skipped and counted (``VideoResult.skipped``). ``name`` is the file's name for messages
    (the upload's, not the temporary copy's).

    The MP4 is written under a temporary name and renamed when complete, so a failed or
    interrupted run leaves no half-written result behind.
    """
    name = name or source.name
    try:
        src = VideoFileSource(source)  # not open_source: an uploaded name is a file, never a spec
    except SourceError:
        raise MediaError(f"`{name}` cannot be decoded as a video (corrupt, empty, or a codec OpenCV lacks). "
                         "Try an MP4 (H.264) or AVI file.") from None
    meta = segmenter.meta
    fps = src.fps if src.fps and 1 <= src.fps <= 240 else 25.0
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="dilseg-demo-video-"))
    sink = Mp4Sink(out_dir / f"{source.stem}_segmented.mp4", fps)
    areas = np.zeros(meta.num_classes)

    def on_result(result) -> None:
        areas[:] += class_areas(result.labels, meta.num_classes)

    def told(done: int, known: int | None) -> None:  # in this thread: a page may draw from it
        progress(done, max(known or 0, done))

    with src:
        stats = Pipeline(src, segmenter, [sink], view=settings, handle_signals=False, on_result=on_result,
                         progress=told if progress else False).run()
    count = stats.frames_out
    return VideoResult(sink.path, count, fps, areas / max(count, 1), stats.seconds, stats.corrupt_skipped)
