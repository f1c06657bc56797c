"""Sources on real files, folders and the synthetic pattern; fail-fast errors; live reopen with back-off."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from dilseg.runtime.sources import (LiveSource, NewestFrame, PushSource, Source, SourceError, SyntheticSource, has_gstreamer,
                                    open_source, test_frame)


def _frames(n: int, w: int = 96, h: int = 64) -> list[np.ndarray]:
    return [test_frame(i, w, h) for i in range(n)]


# --------------------------------------------------------------------------- test://


def test_pattern_is_deterministic_moving_and_has_distinct_regions() -> None:
    a, b, c = test_frame(7, 160, 120), test_frame(7, 160, 120), test_frame(8, 160, 120)
    assert a.shape == (120, 160, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)  # it moves
    colours = {tuple(int(v) for v in px) for px in a.reshape(-1, 3)[::7]}
    assert len(colours) >= 6  # sky, road texture, verge, blocks, disc


def test_test_spec_size_frames_and_file_like() -> None:
    src = open_source("test://160x120?frames=5")
    assert isinstance(src, SyntheticSource) and not src.live and src.frame_count == 5
    frames = list(src)
    assert len(frames) == 5 and all(f.shape == (120, 160, 3) for f in frames)
    assert all(np.array_equal(f, test_frame(i, 160, 120)) for i, f in enumerate(frames))
    assert open_source("test://").read().shape == (480, 640, 3)  # default 640x480


def test_live_test_source_is_paced_at_its_fps() -> None:
    src = open_source("test://64x48?fps=50")
    assert src.live and src.fps == 50
    t0 = time.monotonic()
    for _ in range(11):
        assert src.read() is not None
    elapsed = time.monotonic() - t0
    src.close()
    assert 0.17 <= elapsed < 1.0  # 10 intervals of 20 ms after the first frame


def test_live_test_source_drops_and_is_reopened() -> None:
    src = open_source("test://64x48?fps=0&drop_every=20", reopen_delay=0.01)
    frames = [src.read() for _ in range(70)]
    assert src.reopens == 3
    # The reopened "camera" resumes: no frame is lost or repeated by the reconnect.
    assert all(np.array_equal(f, test_frame(i, 64, 48)) for i, f in enumerate(frames))


@pytest.mark.parametrize("spec, words", [
    ("test://10", "WxH"), ("test://64x48?bogus=1", "unknown option"), ("test://?fps=x", "not a number"),
    ("test://?frames=0", "frames"),
])
def test_bad_test_specs(spec: str, words: str) -> None:
    with pytest.raises(SourceError, match=words):
        open_source(spec)


# --------------------------------------------------------------------------- files and folders


def test_video_file_every_frame_in_order(tmp_path: Path, write_video) -> None:
    frames = _frames(12)
    path = write_video(tmp_path / "v.avi", frames, fps=12, fourcc="MJPG")
    src = open_source(str(path))
    assert not src.live and src.fps == pytest.approx(12) and src.frame_count == 12
    got, names = [], []
    while (frame := src.read()) is not None:
        got.append(frame)
        names.append(src.name)
    assert len(got) == 12 and src.corrupt_frames == 0
    assert names == [f"{i:06d}" for i in range(12)]
    # MJPG is lossy: compare against the frames themselves with a tolerance, in order.
    for want, have in zip(frames, got):
        assert np.abs(want.astype(int) - have.astype(int)).mean() < 6


def test_corrupt_frames_mid_video_are_skipped_and_counted(tmp_path: Path, write_video) -> None:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (64, 96, 3), dtype=np.uint8) for _ in range(60)]
    path = write_video(tmp_path / "v.mp4", frames)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 3000] = np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    src = open_source(str(bad))
    got = list(src)
    assert src.corrupt_frames >= 1
    assert len(got) >= 50  # decoding went on after the damage
    assert len(got) + src.corrupt_frames == 60


def test_folder_natural_order_and_corrupt_image_skipped(tmp_path: Path) -> None:
    names = ["img1", "img2", "img10", "img11", "img3"]
    for i, name in enumerate(names):
        cv2.imwrite(str(tmp_path / f"{name}.png"), test_frame(i, 96, 64))
    good = (tmp_path / "img4.jpg")
    cv2.imwrite(str(good), test_frame(9, 96, 64))
    (tmp_path / "img5.jpg").write_bytes(good.read_bytes()[:40])  # truncated JPEG
    (tmp_path / "img6.jpg").write_bytes(b"not a jpeg at all" * 10)  # garbage
    (tmp_path / "notes.txt").write_text("ignored")
    src = open_source(str(tmp_path))
    seen = []
    while (frame := src.read()) is not None:
        seen.append(src.name)
        assert frame.shape == (64, 96, 3)
    assert seen == ["img1", "img2", "img3", "img4", "img10", "img11"]
    assert src.corrupt_frames == 2
    assert {p.name for p in src.corrupt_paths} == {"img5.jpg", "img6.jpg"}


def test_single_image(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), test_frame(3, 96, 64))
    src = open_source(str(tmp_path / "a.png"))
    assert np.array_equal(src.read(), test_frame(3, 96, 64)) and src.name == "a"
    assert src.read() is None
    assert len(list(open_source(str(tmp_path / "a.png"), repeat=4))) == 4


# --------------------------------------------------------------------------- failing fast


def test_missing_camera_fails_fast_with_advice() -> None:
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=r"no camera at index 42.*--source 0"):
        open_source("42")
    with pytest.raises(SourceError, match="no camera at index 42"):
        open_source(42)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("spec, words", [
    ("ftp://example.com/v.mp4", r"unknown source scheme ftp://.*--source takes"),
    ("nonexistent/video.mp4", "no such file or folder"),
    ("v4l2src ! videoconvert", "does not end in appsink"),
    ("csi://zero", "csi://N"),
    ("", "empty source"),
])
def test_bad_specs_fail_before_anything_starts(spec: str, words: str) -> None:
    with pytest.raises(SourceError, match=words):
        open_source(spec)


def test_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(SourceError, match="cannot open as a video"):
        open_source(str(tmp_path / "clip.mp4"))
    (tmp_path / "pic.jpg").write_bytes(b"garbage")
    with pytest.raises(SourceError, match="cannot decode this image"):
        open_source(str(tmp_path / "pic.jpg"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no images in this folder"):
        open_source(str(empty))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(SourceError, match="none of its 1 images"):
        open_source(str(bad))


def test_stream_url_that_does_not_answer_fails_fast() -> None:
    t0 = time.monotonic()
    with pytest.raises(SourceError, match="cannot open the stream"):
        open_source("rtsp://127.0.0.1:9/none", timeout_ms=2000)
    assert time.monotonic() - t0 < 15


@pytest.mark.skipif(has_gstreamer(), reason="this OpenCV has GStreamer")
def test_gstreamer_sources_need_gstreamer() -> None:
    with pytest.raises(SourceError, match="GStreamer: NO"):
        open_source("csi://0")
    with pytest.raises(SourceError, match="needs OpenCV built with GStreamer"):
        open_source("videotestsrc ! videoconvert ! appsink")


# --------------------------------------------------------------------------- reopen with back-off


def test_live_capture_reopens_with_exponential_backoff(tmp_path: Path, write_video, caplog) -> None:
    """A real cv2.VideoCapture on a file stands in for a camera: when it ends the read fails
    (a drop); the file is missing for a while, so reopen attempts fail and back off, then it
    comes back and the source continues."""
    path = write_video(tmp_path / "cam.avi", _frames(3), fourcc="MJPG")
    hidden = tmp_path / "away.avi"
    src = LiveSource("cam", lambda: cv2.VideoCapture(str(path)), "no cam", reopen_delay=0.05,
                     reopen_max_delay=1.0, reopen_attempts=8)
    for _ in range(3):
        assert src.read() is not None
    shutil.move(path, hidden)
    restore = threading.Timer(0.45, lambda: shutil.move(hidden, path))
    restore.start()
    caplog.set_level(logging.WARNING, logger="dilseg.sources")
    t0 = time.monotonic()
    frame = src.read()
    waited = time.monotonic() - t0
    restore.join()
    assert frame is not None and src.reopens == 1 and not src.lost
    delays = [float(r.getMessage().split("reopening in ")[1].split("s")[0])
              for r in caplog.records if "reopening in" in r.getMessage()]
    assert delays[:4] == [0.05, 0.1, 0.2, 0.4][: len(delays[:4])] and len(delays) >= 3
    assert any("reopened after" in r.getMessage() for r in caplog.records)
    assert 0.4 < waited < 3.0
    src.close()


def test_live_capture_gives_up_after_its_attempts(tmp_path: Path, write_video) -> None:
    path = write_video(tmp_path / "cam.avi", _frames(2), fourcc="MJPG")
    src = LiveSource("cam", lambda: cv2.VideoCapture(str(path)), "no cam", reopen_delay=0.01, reopen_attempts=3)
    assert src.read() is not None and src.read() is not None
    os.unlink(path)
    assert src.read() is None
    assert src.lost and src.reopens == 0


def test_interrupt_wakes_a_waiting_live_source() -> None:
    src = open_source("test://64x48?fps=0.5")
    src.read()  # the validation frame; the next one is 2 s away
    threading.Timer(0.2, src.interrupt).start()
    t0 = time.monotonic()
    assert src.read() is None
    assert time.monotonic() - t0 < 1.0


class SteppedCamera(Source):
    """A live source the test drives: ``read()`` returns test frame i once the test has let
    frame i through (``allow(n)``), so which frames exist when the reader looks is known
    exactly, whatever the machine's load."""

    live = True
    spec = "stepped://"

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.allowed = 0  # frames the test has let through
        self.calls = 0  # read() calls so far: call k+1 has begun once frame k was handed on
        self.stopped = False

    def allow(self, n: int) -> None:
        with self.cond:
            self.allowed += n
            self.cond.notify_all()

    def wait_handed_on(self, n: int) -> None:
        """Until the draining thread has handed frames 0..n-1 to the slot (it is in read() n+1)."""
        with self.cond:
            assert self.cond.wait_for(lambda: self.calls > n, 10), f"the drain thread never asked for frame {n}"

    def read(self):
        with self.cond:
            self.calls += 1
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.stopped or self.index + 1 < self.allowed)
            if self.stopped:
                return None
            self.index += 1
        self.name = f"{self.index:06d}"
        return test_frame(self.index, 64, 48)

    def interrupt(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


def test_newest_frame_keeps_a_slow_reader_in_the_present() -> None:
    camera = SteppedCamera()
    src = NewestFrame(camera)
    try:
        seen = []
        handed = 0
        for burst in (1, 5, 3, 7):
            # The camera delivers a burst while the reader is busy; the reader then gets the
            # newest frame of the burst, not the next one of a backlog.
            camera.allow(burst)
            handed += burst
            camera.wait_handed_on(handed)
            frame = src.read()
            seen.append(src.index)
            np.testing.assert_array_equal(frame, test_frame(src.index, 64, 48))  # the frame it names
        assert seen == [0, 5, 8, 15]
        assert src.dropped == 0 + 4 + 2 + 6
    finally:
        src.close()
    assert not src._thread.is_alive()
    assert src.read() is None


@pytest.mark.parametrize("stop", ["interrupt", "close"])
def test_newest_frame_returns_nothing_once_interrupted_or_closed(stop: str) -> None:
    """A frame waiting in the slot when interrupt()/close() is called must not come out."""
    camera = SteppedCamera()
    src = NewestFrame(camera)
    camera.allow(1)
    assert src.read() is not None and src.index == 0
    camera.allow(1)
    camera.wait_handed_on(2)  # frame 1 now waits in the slot
    getattr(src, stop)()
    assert src.read() is None and src.read() is None
    src.close()
    # The same with a busy real producer (a frame is waiting almost every time), many times.
    for i in range(40):
        src = NewestFrame(open_source("test://32x24?fps=1000"))
        try:
            assert src.read() is not None
            time.sleep(0.003)  # the producer puts the next frame in the slot meanwhile
            getattr(src, stop)()
            assert src.read() is None, f"iteration {i}: a pending frame came out after {stop}()"
            assert src.read() is None
        finally:
            src.close()


def test_newest_frame_ends_with_its_source_and_passes_errors_on() -> None:
    src = NewestFrame(open_source("test://32x24?frames=3&fps=100"))
    frames = list(src)
    assert 1 <= len(frames) <= 3 and src.read() is None

    class Broken(Source):
        spec = "broken://"

        def read(self):
            raise RuntimeError("device unplugged")

    with pytest.raises(RuntimeError, match="device unplugged"):
        NewestFrame(Broken()).read()


def test_a_file_played_as_a_camera_loops_at_its_frame_rate(tmp_path: Path, write_video) -> None:
    path = write_video(tmp_path / "clip.avi", _frames(3), fps=40, fourcc="MJPG")
    src = open_source(str(path), loop=True)
    assert src.live and src.fps == pytest.approx(40)
    t0 = time.monotonic()
    names = []
    for _ in range(9):
        assert src.read() is not None
        names.append(src.name)
    elapsed = time.monotonic() - t0
    src.close()
    assert names == ["000000", "000001", "000002"] * 3 and src.index == 8 and src.loops == 2
    assert 0.17 <= elapsed < 2.0  # 8 intervals of 25 ms: paced like a camera, not read flat out


def test_a_folder_played_as_a_camera_counts_corrupt_images_over_its_loops(tmp_path: Path) -> None:
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), test_frame(i, 32, 24))
    (tmp_path / "f1b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    src = open_source(str(tmp_path), loop=True, fps=200)
    assert [(src.read() is not None, src.name) for _ in range(5)] == [(True, "f0"), (True, "f1"), (True, "f0"),
                                                                      (True, "f1"), (True, "f0")]
    assert src.corrupt_frames == 2 and isinstance(src.corrupt_frames, int)
    src.close()
    assert open_source("test://", loop=True).live  # a live source is left as it is


def test_push_source_hands_over_the_newest_and_ends_when_the_producer_goes() -> None:
    src = PushSource(convert=lambda i: test_frame(i, 32, 24), idle_s=0.3)
    for i in range(5):
        assert src.push(i)
    np.testing.assert_array_equal(src.read(), test_frame(4, 32, 24))  # the newest, converted by the reader
    assert src.dropped == 4 and src.name == "000000"
    t0 = time.monotonic()
    assert src.read() is None and 0.25 < time.monotonic() - t0 < 2.0  # nothing pushed for idle_s
    assert src.ended and not src.push(5)
    closed = PushSource()
    closed.push(test_frame(0, 32, 24))
    closed.close()
    assert closed.read() is None  # a pending frame does not come out after close()
