"""The threaded pipeline on real inputs with a real ONNX Runtime session on a small exported model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from dilseg.runtime.backends import open_backend
from dilseg.runtime.bench import rss_bytes
from dilseg.runtime.pipeline import Pipeline, PipelineStats, StageTimes
from dilseg.runtime.segmenter import Segmenter
from dilseg.runtime.sinks import LabelFolderSink, OverlayFolderSink, Sink, SinkError, VideoSink
from dilseg.runtime.sources import LatestSlot, open_source, test_frame
from dilseg.runtime.view import ViewSettings


@pytest.fixture(scope="module")
def segmenter(small_onnx) -> Segmenter:
    return Segmenter(open_backend(small_onnx, threads=1))


class SlowSink(Sink):
    """A consumer slower than the camera (think: a slow display or network), for drop tests."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def write(self, frame, labels, rendered, name=None) -> None:
        time.sleep(self.seconds)


class FailingSink(Sink):
    """A sink whose disk "fills up" at frame ``at``."""

    def __init__(self, at: int) -> None:
        self.at, self.count = at, 0

    def write(self, frame, labels, rendered, name=None) -> None:
        self.count += 1
        if self.count == self.at:
            raise SinkError("disk full")


def test_video_file_end_to_end_masks_equal_direct_inference(tmp_path: Path, segmenter, write_video,
                                                            video_frames) -> None:
    source_frames = [test_frame(i * 3, 160, 120) for i in range(20)]
    video = write_video(tmp_path / "in.mp4", source_frames, fps=12)
    out = tmp_path / "out.mp4"
    src = open_source(str(video))
    sinks = [VideoSink(out, fps=src.fps), LabelFolderSink(tmp_path / "labels"), OverlayFolderSink(tmp_path / "ov")]
    stats = Pipeline(src, segmenter, sinks, view=ViewSettings(alpha=0.6)).run()
    assert stats.frames_in == stats.frames_out == 20 and stats.dropped == 0 and stats.corrupt_skipped == 0

    written = video_frames(out)
    assert len(written) == 20 and written[0].shape == (120, 160, 3)
    assert cv2.VideoCapture(str(out)).get(cv2.CAP_PROP_FPS) == pytest.approx(12)

    decoded = video_frames(video)  # the frames the pipeline saw (after mp4v compression)
    assert len(decoded) == 20
    classes = set()
    for i, frame in enumerate(decoded):
        mask = cv2.imread(str(tmp_path / "labels" / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
        direct = segmenter(frame).labels
        assert mask.shape == (120, 160) and np.array_equal(mask, direct), f"frame {i}"
        classes |= set(np.unique(mask).tolist())
    assert len(classes) >= 4  # the comparison is not between two constant masks
    assert len(list((tmp_path / "ov").glob("*.jpg"))) == 20
    for name, p in stats.percentiles().items():
        assert p["n"] == 20 and p["p50"] <= p["p95"], name
    assert {"capture", "preprocess", "infer", "postprocess", "render", "write", "latency"} <= set(stats.stages)
    assert stats.fps > 0


def test_logits_and_dynamic_models_give_the_same_masks(tmp_path, small_model, small_onnx, small_onnx_logits,
                                                       small_onnx_dynamic) -> None:
    from dataclasses import replace

    from dilseg.export.onnx_export import export_onnx
    from dilseg.runtime.classes import PRESETS

    # The logits graph is the full-resolution head; its labels twin must be that head too (the
    # default label head, "half", decides at half resolution and may differ by design).
    full = tmp_path / "edge_s_full_head.onnx"
    export_onnx(small_model, replace(PRESETS["camvid"].model_meta("edge_s", (64, 96)), output_kind="labels"), full, (64, 96), head="full")
    frames = [test_frame(i, 96, 64) for i in range(6)]  # what test://96x64 yields
    results = {}
    for key, path in (("labels", small_onnx), ("logits", small_onnx_logits), ("dynamic", small_onnx_dynamic),
                      ("full", full)):
        seen: list[np.ndarray] = []
        Pipeline(open_source("test://96x64?frames=6"), Segmenter(open_backend(path, threads=1)),
                 on_result=lambda r: seen.append(r.labels)).run()
        results[key] = np.stack(seen)
    direct = np.stack([Segmenter(open_backend(small_onnx, threads=1))(f).labels for f in frames])
    assert np.array_equal(results["labels"], direct)
    # Same weights and head, argmax outside the graph: equal up to float ties.
    assert (results["logits"] == results["full"]).mean() > 0.999
    # 96x64 frames are the trace size of the fixed model, so the dynamic one sees the same input.
    assert (results["dynamic"] == results["labels"]).mean() > 0.999


def test_folder_keeps_order_and_skips_corrupt_image(tmp_path: Path, segmenter) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    order = ["f1", "f2", "f3", "f9", "f10", "f11", "f12"]
    for i, name in enumerate(order):
        cv2.imwrite(str(folder / f"{name}.png"), test_frame(i * 5, 96, 64))
    (folder / "f4.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    names: list[str] = []
    stats = Pipeline(open_source(str(folder)), segmenter, [LabelFolderSink(tmp_path / "masks")],
                     on_result=lambda r: names.append(r.name)).run()
    assert names == order
    assert stats.corrupt_skipped == 1 and stats.frames_out == len(order)
    for i, name in enumerate(order):
        mask = cv2.imread(str(tmp_path / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(mask, segmenter(test_frame(i * 5, 96, 64)).labels)


def test_live_source_drops_old_frames_and_keeps_the_newest(segmenter) -> None:
    """Camera at 200 FPS, consumer at ~25 FPS: frames are dropped at the slot, never queued,
    so what comes out is always recent."""
    results = []
    p = Pipeline(open_source("test://96x64?fps=200"), segmenter, [SlowSink(0.04)], max_frames=25,
                 on_result=lambda r: results.append((r.index, time.perf_counter() - r.captured_at)))
    stats = p.run()
    assert stats.frames_out == 25 and stats.stopped_by == "max-frames"
    assert stats.dropped > 25  # most camera frames never reached inference
    indices = [i for i, _ in results]
    assert indices == sorted(indices) and len(set(indices)) == 25
    assert indices[-1] - indices[0] > 60  # gaps: the camera ran on while the consumer was busy
    # Age at output stays about two consumer periods (~80 ms: one waiting in the one-deep
    # hand-off, one in the sink) instead of growing with a backlog (a 4-deep FIFO alone would
    # add 160 ms).
    ages = [age for _, age in results[5:]]
    assert max(ages) < 0.2
    assert abs(np.mean(ages[-5:]) - np.mean(ages[:5])) < 0.08


def test_file_source_with_slow_consumer_loses_nothing(segmenter) -> None:
    indices: list[int] = []
    stats = Pipeline(open_source("test://96x64?frames=15"), segmenter, [SlowSink(0.01)],
                     on_result=lambda r: indices.append(r.index)).run()
    assert indices == list(range(15)) and stats.dropped == 0 and stats.frames_in == 15


def test_latest_slot_keeps_the_newest() -> None:
    slot = LatestSlot()
    for i in range(4):
        slot.put(i)
    assert slot.get(timeout=0) == 3 and slot.dropped == 3
    with pytest.raises(Exception):
        slot.get(timeout=0.01)


def test_max_frames_on_file_and_stop_from_another_thread(segmenter) -> None:
    stats = Pipeline(open_source("test://96x64?frames=50"), segmenter, max_frames=7).run()
    assert stats.frames_out == 7 and stats.frames_in == 7
    p = Pipeline(open_source("test://96x64?fps=30"), segmenter)
    threading.Timer(0.5, p.stop).start()
    t0 = time.monotonic()
    stats = p.run()
    assert time.monotonic() - t0 < 3 and stats.stopped_by == "stop()" and stats.frames_out > 3


def test_run_in_a_worker_thread_does_not_touch_signals(segmenter) -> None:
    box = {}
    t = threading.Thread(target=lambda: box.update(stats=Pipeline(open_source("test://96x64?frames=3"), segmenter).run()))
    t.start()
    t.join(30)
    assert box["stats"].frames_out == 3


def test_a_failing_sink_stops_the_run_and_keeps_the_healthy_video_finalised(tmp_path: Path, segmenter,
                                                                            video_frames) -> None:
    video, failing = VideoSink(tmp_path / "out.mp4"), FailingSink(at=5)
    pipeline = Pipeline(open_source("test://96x64?frames=40"), segmenter, [video, failing])
    with pytest.raises(SinkError, match="disk full"):
        pipeline.run()
    # The video got frames 0-4 and the one the other sink failed on: finalised, playable, no temporary left.
    assert list(tmp_path.iterdir()) == [tmp_path / "out.mp4"]
    assert len(video_frames(tmp_path / "out.mp4")) == video.count == 5
    assert pipeline.kept == [video] and pipeline.failed_sinks == [failing]


def test_warmup_is_left_out_of_timings() -> None:
    stats = PipelineStats(warmup=2)
    times = StageTimes(capacity=4)
    for v in (1, 2, 3, 4, 5, 6):
        times.add(v)
    assert list(times.values()) == [5, 6, 3, 4] and times.count == 6 and times.mean == 3.5
    assert stats.measured_frames == 0 and stats.fps == 0.0


def test_memory_does_not_grow_over_many_frames(segmenter) -> None:
    rss: dict[int, int] = {}

    def probe(result) -> None:
        if result.index in (400, 1999):
            rss[result.index] = rss_bytes()

    stats = Pipeline(open_source("test://96x64?frames=2000"), segmenter, [Sink()], on_result=probe).run()
    assert stats.frames_out == 2000
    growth = (rss[1999] - rss[400]) / (1 << 20)
    assert growth < 8.0, f"RSS grew by {growth:.1f} MiB from frame 400 to 2000"


def test_latest_sink_publishes_each_result_and_a_swapped_view_applies_to_later_frames(segmenter) -> None:
    from dilseg.runtime.sinks import LatestSink

    sink, calls, seen = LatestSink(), [], []
    sink.subscribe(lambda: calls.append(sink.seq))
    pipeline = Pipeline(open_source("test://96x64?frames=6"), segmenter, [sink], view=ViewSettings("mask"))

    def on_result(result) -> None:
        seen.append(result)
        assert sink.latest() is result  # published before on_result runs
        if result.index == 2:
            pipeline.view = ViewSettings("side-by-side")

    pipeline.on_result = on_result
    pipeline.run()
    assert [r.index for r in seen] == list(range(6)) and calls == [1, 2, 3, 4, 5, 6, 6]  # and once on close
    assert sink.closed and sink.latest() is seen[-1]
    for r in seen:
        assert r.meta is segmenter.meta and r.labels.shape == (64, 96)
        want = ViewSettings("mask" if r.index <= 2 else "side-by-side")  # drawn after on_result(2)
        assert r.rendered.shape == ((64, 96, 3) if want.view == "mask" else (64, 192, 3)), r.index
        np.testing.assert_array_equal(r.rendered, want.render(r.frame, r.labels, r.meta))


def test_stage_timings_mean_the_same_on_a_backend_that_preprocesses_frames_itself(small_onnx) -> None:
    """A frame-input backend (TensorRT with GPU preprocessing, or its CPU fallback when there is
    no nvcc) preprocesses inside infer_frame and reports that time in its own split; the
    Segmenter's "preprocess" is that time, and "infer" the rest of the call, as on ONNX Runtime."""
    from dilseg.runtime.backends.base import Capabilities
    from dilseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from dilseg.runtime.preprocess import preprocess

    class FrameInputBackend(OnnxRuntimeBackend):  # what TensorRT's runner does without nvcc
        capabilities = Capabilities(frame_input=True, stage_timings=True)

        def infer_frame(self, frame_bgr):
            t0 = time.perf_counter()
            tensor = preprocess(frame_bgr, self.meta)
            time.sleep(0.02)  # a preprocessing step long enough to tell from inference
            pre_ms = (time.perf_counter() - t0) * 1e3
            output = self.infer(tensor)
            self.last_timings = {"host_preprocess": pre_ms, "backend_infer": 1.0}
            return output

    frame = test_frame(3, 160, 120)
    plain = Segmenter(open_backend(small_onnx, threads=1))
    framed = Segmenter(FrameInputBackend(small_onnx, threads=1).load())
    # The multi-stream path (one backend shared through a Batcher) splits the same way.
    from dilseg.runtime.batching import Batcher

    batcher = Batcher(framed.backend)
    stream = batcher.stream("s")
    try:
        shared = stream.process(frame)
        assert shared.timings["preprocess"] >= 20.0
        assert 0.0 < shared.timings["infer"] < 20.0
    finally:
        stream.close()
        batcher.close()
    for _ in range(2):
        t0 = time.perf_counter()
        result = framed.process(frame)
        wall_ms = (time.perf_counter() - t0) * 1e3
        own = framed.backend.last_timings
        assert result.timings["preprocess"] == own["host_preprocess"] >= 20.0
        assert result.timings["backend_infer"] == 1.0  # the backend's own split is kept beside
        assert 0.0 < result.timings["infer"] < wall_ms - own["host_preprocess"]
        assert result.timings["preprocess"] + result.timings["infer"] + result.timings["postprocess"] <= wall_ms
    np.testing.assert_array_equal(result.labels, plain.process(frame).labels)
    # A backend without its own split reports no preprocessing of its own.
    assert plain.backend.own_preprocess_ms() == 0.0
    framed.close()
    plain.close()
