"""A bound on the size of a decoded image, checked from its header before anything is decoded.

A PNG of 30000x30000 pixels compresses to under a megabyte and decodes to 2.7 GB of BGR pixels
(more while it is resized and drawn): the bound refuses it in a line that says the limit and how
to raise it, instead of a traceback after gigabytes or a server ended by the kernel's OOM killer.
Headers are read with ``imagesize`` (PNG, JPEG, JPEG 2000, GIF, TIFF, WebP, BMP, Netpbm), which
reads a few bytes and decodes nothing. The same bound applies to ``test://WxH``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from .errors import DilsegError

ENV = "DILSEG_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 100_000_000  # 100 megapixels: a 12000x8000 photo fits, about 300 MB decoded


class ImageTooLargeError(DilsegError, ValueError):
    """An image (or a synthetic frame size) has more pixels than the budget allows."""


def max_pixels() -> int:
    """The budget: ``DILSEG_MAX_IMAGE_PIXELS`` when set, else ``DEFAULT_MAX_PIXELS``."""
    text = os.environ.get(ENV, "").strip().replace("_", "")
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(text))
    except ValueError:
        raise ImageTooLargeError(f"{ENV}={os.environ[ENV]!r} is not a number of pixels (e.g. {ENV}=200000000)") \
            from None
    if value < 1:
        raise ImageTooLargeError(f"{ENV}={os.environ[ENV]!r}: the pixel limit must be >= 1")
    return value


def check_pixels(width: int, height: int, what: str) -> None:
    """Raise ImageTooLargeError naming ``what`` when width x height is over the budget."""
    limit = max_pixels()
    pixels = int(width) * int(height)
    if pixels > limit:
        raise ImageTooLargeError(
            f"{what}: {width}x{height} is {pixels / 1e6:.0f} megapixels, over the limit of {limit / 1e6:g} "
            f"megapixels (decoding it takes {pixels * 3 / (1 << 30):.1f} GiB and more to process); downscale it, "
            f"or raise the limit with the environment variable {ENV} (e.g. {ENV}={_suggest(pixels)})")


def header_size(data: bytes | memoryview | str | Path) -> tuple[int, int] | None:
    """(width, height) from an image file's header, or None when the format is not recognised."""
    import imagesize

    target = io.BytesIO(bytes(data)) if isinstance(data, (bytes, bytearray, memoryview)) else str(data)
    try:
        w, h = imagesize.get(target)
    except (OSError, ValueError, IndexError, TypeError):  # a header too damaged to read
        return None
    return (w, h) if w > 0 and h > 0 else None


def check_image(data: bytes | memoryview | str | Path, what: str) -> None:
    """Refuse an encoded image (bytes or a path) whose header announces more pixels than the budget.
    An unrecognised header passes: the decoder then says whether it is an image at all."""
    size = header_size(data)
    if size is not None:
        check_pixels(size[0], size[1], what)


def _suggest(pixels: int) -> int:
    """A round limit just above ``pixels``, for the message."""
    step = 10 ** max(0, len(str(pixels)) - 1)
    return (pixels // step + 1) * step
