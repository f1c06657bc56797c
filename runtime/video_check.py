"""Whether a video written through cv2.VideoWriter is really there.

``cv2.VideoWriter.write`` returns nothing and only logs a failed write: on a full disk it goes on
"writing", and ``release()`` leaves an MP4 without its index (no playable frame) or an AVI with
part of the frames. So the writer's output is watched while it grows (``GrowthWatch``: a file that
stopped growing on a filesystem with no room left) and read back before it replaces anything
(``unreadable_reason``: the container must open and announce every frame written).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2

# Below this much free space a writer that has stopped growing is taken to be out of room:
# encoders write in blocks of tens of kilobytes, so a disk this full cannot take the next one.
FULL_BELOW_BYTES = 256 << 10


def free_bytes(folder: str | Path) -> int:
    """Bytes this process may still write in ``folder``'s filesystem (root may use the reserve)."""
    st = os.statvfs(folder)
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _disk_full(folder: Path) -> str | None:
    try:
        free = free_bytes(folder)
    except OSError:
        return None
    if free < FULL_BELOW_BYTES:
        return f"no space left on the device holding {folder} ({free >> 10} KiB free)"
    return None


class GrowthWatch:
    """Every ``every`` frames, check that ``path`` grew; when it did not and its filesystem is full,
    ``check`` returns the reason (the writes are failing), else None."""

    def __init__(self, path: str | Path, every: int = 16) -> None:
        self.path, self.every = Path(path), every
        self._size = -1
        self._frames = 0

    def check(self, frames: int) -> str | None:
        if frames - self._frames < self.every:
            return None
        self._frames = frames
        try:
            size = os.stat(self.path).st_size
        except OSError:
            return None
        grew, self._size = size > self._size, size
        return None if grew else _disk_full(self.path.parent)


def frame_count(path: str | Path) -> int:
    """Frames the container at ``path`` announces when opened for reading; -1 when it cannot be
    opened (an MP4 without its index, garbage)."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            return -1
        return int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    finally:
        cap.release()


def unreadable_reason(path: str | Path, written: int) -> str | None:
    """Why the video at ``path`` does not hold the ``written`` frames, or None when it does."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"the written file is gone ({exc.strerror})"
    found = frame_count(path) if size else -1
    if found == written:
        return None
    cause = _disk_full(path.parent) or "the video writer failed (see OpenCV's log)"
    got = "cannot be opened" if found < 0 else f"holds {found} of them"
    return f"{written} frames were written but the file {got}: {cause}"
