"""Refuse outputs that would replace an input: ``--source v.mp4 --output v.mp4``, or an overlay or
label folder that is the folder of the source images (its files are named after the images).

Paths are compared as files, not as strings (``os.path.samefile``: the same device and inode), so
``./v.mp4``, a symlink to it and a hard link to it all count as the input itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .errors import CliError


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): it cannot be the other
        return False


def input_files(source: str) -> tuple[list[Path], Path | None]:
    """The files a source spec reads, and the folder its images come from (None for a video, a
    stream or a camera)."""
    path = Path(str(source)).expanduser()
    if "://" in str(source) or not path.exists():
        return [], None
    if path.is_dir():
        return [p for p in path.iterdir() if p.is_file()], path
    return [path], None


def check_outputs(source: str, video: str | None = None,
                  folders: Iterable[tuple[str, str | None, str]] = ()) -> None:
    """Raise CliError when an output would overwrite the source.

    ``video``: the --output file; ``folders``: (flag, DIR, extension) of image outputs named after
    the source's images, such as ("--overlays", "viz/", ".jpg"). An output folder that is the
    source folder is refused whatever the names (the next run would read the outputs as input).
    """
    files, image_dir = input_files(source)
    if video:
        out = Path(video).expanduser()
        for f in files:
            if _same(out, f):
                link = "" if os.path.abspath(out) == os.path.abspath(f) else " (the same file, through a link)"
                raise CliError(f"--output {video}: would overwrite the input {f}{link}; write the result to "
                               "another file")
    for flag, folder, ext in folders:
        if not folder:
            continue
        out = Path(folder).expanduser()
        if image_dir is not None and _same(out, image_dir):
            raise CliError(f"{flag} {folder}: is the source folder {image_dir}; its images would be overwritten "
                           "by the outputs named after them; choose another folder")
        for f in files:
            if _same(out / f"{f.stem}{ext}", f):
                raise CliError(f"{flag} {folder}: would overwrite the input {f} with the output named after it; "
                               "choose another folder")
