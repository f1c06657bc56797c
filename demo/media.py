"""Uploaded images and videos: decode, segment, render, encode for download.

Kept free of Streamlit so the page stays a thin layer and these run (and fail) the same
way from a test.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from dilseg.runtime.postprocess import class_areas, colorize, palette_bgr, render
from dilseg.runtime.segmenter import Segmenter

from .settings import ViewSettings

IMAGE_TYPES = ["png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"]
VIDEO_TYPES = ["mp4", "avi", "mov", "mkv", "webm", "m4v", "mpg", "mpeg"]


class MediaError(ValueError):
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
    """Uploaded bytes -> BGR uint8 image, or a MediaError that says why not."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise MediaError(f"`{name}` is not an image this demo can read. "
                         f"Upload a {', '.join(t.upper() for t in IMAGE_TYPES[:4])} or WebP picture.")
    return image


def segment_image(image: np.ndarray, segmenter: Segmenter, settings: ViewSettings) -> ImageResult:
    meta = segmenter.meta
    seg = segmenter(image)
    picture = render(image, seg.labels, meta, settings.view, settings.alpha, settings.visible_list)
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


def _even(n: int) -> int:
    return n - n % 2


def segment_video(source: Path, segmenter: Segmenter, settings: ViewSettings,
                  progress: Callable[[int, int], None] | None = None, out_dir: Path | None = None) -> VideoResult:
    """Every frame in order -> rendered H.264 MP4 (browsers play it inline).

    The MP4 is written under a temporary name and renamed when complete, so a failed or
    interrupted run leaves no half-written result behind.
    """
    import av

    cap = cv2.VideoCapture(str(source))
    try:
        ok, frame = cap.read() if cap.isOpened() else (False, None)
        if not ok or frame is None:
            raise MediaError(f"`{source.name}` cannot be decoded as a video (corrupt, empty, or a codec OpenCV lacks). "
                             "Try an MP4 (H.264) or AVI file.")
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or 0
        fps = cap.get(cv2.CAP_PROP_FPS)
        fps = fps if fps and 1 <= fps <= 240 else 25.0
        meta = segmenter.meta
        out_dir = Path(out_dir or tempfile.mkdtemp(prefix="dilseg-demo-video-"))
        final = out_dir / f"{source.stem}_segmented.mp4"
        tmp = out_dir / f".{final.name}.part"
        areas = np.zeros(meta.num_classes)
        start, count = time.perf_counter(), 0
        try:
            with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
                stream = None
                while ok:
                    seg = segmenter(frame)
                    picture = render(frame, seg.labels, meta, settings.view, settings.alpha, settings.visible_list)
                    if stream is None:
                        # yuv420p needs even sizes; one pixel off the edge is not worth a resize.
                        h, w = _even(picture.shape[0]), _even(picture.shape[1])
                        stream = container.add_stream("libx264", rate=round(fps))
                        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                        stream.options = {"preset": "veryfast", "crf": "23"}
                    out = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture[:h, :w]), format="bgr24")
                    for packet in stream.encode(out):
                        container.mux(packet)
                    areas += class_areas(seg.labels, meta.num_classes)
                    count += 1
                    if progress:
                        progress(count, max(total, count))
                    ok, frame = cap.read()
                for packet in stream.encode():
                    container.mux(packet)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
    finally:
        cap.release()
    return VideoResult(final, count, fps, areas / max(count, 1), time.perf_counter() - start)
