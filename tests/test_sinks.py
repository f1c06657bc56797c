"""Sinks write real files that are complete or absent, and refuse bad destinations clearly."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from dilseg.runtime.sinks import (LabelFolderSink, OverlayFolderSink, Sink, SinkError, VideoSink, WindowSink,
                                  gui_available, open_sink)
from dilseg.runtime.sources import test_frame


def _labels(i: int, h: int = 64, w: int = 96) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 11, (h, w), dtype=np.uint8)


def test_video_sink_is_absent_until_closed_then_complete(tmp_path: Path, video_frames) -> None:
    out = tmp_path / "out.mp4"
    sink = open_sink(str(out), fps=15)
    assert isinstance(sink, VideoSink)
    for i in range(9):
        frame = test_frame(i, 96, 64)
        sink.write(frame, _labels(i), frame)
    assert not out.exists()  # still under its temporary name
    assert sink.tmp.exists() and sink.tmp.parent == tmp_path
    sink.close()
    assert out.exists() and not sink.tmp.exists()
    frames = video_frames(out)
    assert len(frames) == 9 and frames[0].shape == (64, 96, 3)
    cap = cv2.VideoCapture(str(out))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(15)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_video_sink_resizes_frames_of_another_size(tmp_path: Path, video_frames) -> None:
    sink = VideoSink(tmp_path / "v.avi")
    sink.write(None, None, test_frame(0, 96, 64))
    sink.write(None, None, test_frame(1, 160, 120))
    sink.close()
    frames = video_frames(tmp_path / "v.avi")
    assert [f.shape for f in frames] == [(64, 96, 3)] * 2


def test_video_sink_without_frames_or_aborted_leaves_nothing(tmp_path: Path) -> None:
    VideoSink(tmp_path / "empty.mp4").close()
    sink = VideoSink(tmp_path / "aborted.mp4")
    sink.write(None, None, test_frame(0, 96, 64))
    sink.abort()
    assert list(tmp_path.iterdir()) == []


def test_label_pngs_are_lossless_class_ids_named_by_frame(tmp_path: Path) -> None:
    sink = open_sink(f"labels:{tmp_path / 'masks'}")
    assert isinstance(sink, LabelFolderSink)
    written = {}
    for i, name in enumerate(["0001_a", "0002_b", None]):
        labels = _labels(i)
        sink.write(test_frame(i, 96, 64), labels, test_frame(i, 96, 64), name=name)
        written[name or "000002"] = labels
    sink.close()
    files = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert files == ["000002.png", "0001_a.png", "0002_b.png"]
    for stem, labels in written.items():
        back = cv2.imread(str(tmp_path / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert back.dtype == np.uint8 and back.ndim == 2
        assert np.array_equal(back, labels)


def test_label_sink_rejects_non_label_arrays(tmp_path: Path) -> None:
    sink = LabelFolderSink(tmp_path)
    with pytest.raises(SinkError, match="HxW uint8"):
        sink.write(None, np.zeros((4, 4), np.int32), None)


def test_overlay_folder(tmp_path: Path) -> None:
    sink = open_sink(f"overlays:{tmp_path / 'viz'}")
    assert isinstance(sink, OverlayFolderSink)
    rendered = test_frame(5, 96, 64)
    sink.write(None, None, rendered, name="frame5")
    png = OverlayFolderSink(tmp_path / "png", ext="png")
    png.write(None, None, rendered)
    back = cv2.imread(str(tmp_path / "viz" / "frame5.jpg"))
    assert back.shape == rendered.shape and np.abs(back.astype(int) - rendered).mean() < 4
    assert np.array_equal(cv2.imread(str(tmp_path / "png" / "000000.png")), rendered)
    assert not [p for p in (tmp_path / "viz").iterdir() if p.name.startswith(".")]  # no temporaries left


def test_none_sink() -> None:
    sink = open_sink("none")
    assert type(sink) is Sink
    sink.write(None, None, None)
    sink.close()


@pytest.mark.parametrize("spec, words", [
    ("out.xyz", "unknown sink"),
    ("video:out.gif", "unknown video extension"),
    ("no/such/folder/out.mp4", "does not exist"),
    ("bogus:thing", "unknown sink"),
])
def test_bad_sinks(spec: str, words: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SinkError, match=words):
        open_sink(spec)


def test_sink_folder_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(SinkError, match="cannot create|not a folder"):
        open_sink(f"labels:{tmp_path / 'f'}")
    with pytest.raises(SinkError, match="does not exist"):
        open_sink(str(tmp_path / "f" / "out.mp4"))
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(SinkError, match="is a folder"):
        open_sink(str(tmp_path / "d.mp4"))


@pytest.mark.skipif(gui_available()[0], reason="this machine can show windows")
def test_window_without_gui_is_a_clear_error() -> None:
    with pytest.raises(SinkError, match="cannot show a window: .*(--output|display)"):
        open_sink("window")
    with pytest.raises(SinkError):
        WindowSink()
