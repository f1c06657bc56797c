"""Several sources through one backend: `dilseg run/bench --source A --source B ...`, the Batcher
and the MultiStream, on real video files, test:// streams and a real HTTP server killed mid-run."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from dilseg.runtime.backends import open_backend
from dilseg.runtime.cli import main
from dilseg.runtime.multistream import Mosaic, MultiStream
from dilseg.runtime.segmenter import Segmenter
from dilseg.runtime.sinks import Sink, open_sink
from dilseg.runtime.sources import open_source, test_frame
from dilseg.runtime.trt.build import resolve_profile


@pytest.fixture(scope="module")
def clips(tmp_path_factory, write_video):
    """Two real video files of different sizes, lengths and content."""
    folder = tmp_path_factory.mktemp("clips")
    a = write_video(folder / "a.mp4", [test_frame(i * 3, 128, 96) for i in range(14)], fps=10)
    b = write_video(folder / "b.avi", [test_frame(100 + i * 5, 160, 120) for i in range(9)], fps=10, fourcc="MJPG")
    return a, b


def masks(folder: Path) -> list[np.ndarray]:
    return [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(folder.glob("*.png"))]


def test_export_batch_frees_or_fixes_the_batch_axis(small_onnx, batch_onnx, tmp_path, capsys):
    import onnxruntime as ort

    assert ort.InferenceSession(str(batch_onnx)).get_inputs()[0].shape[0] == "batch"
    fixed = tmp_path / "b3.onnx"
    assert main(["export", "onnx", "--from", str(small_onnx), "--batch", "3", "-o", str(fixed)]) == 0
    assert ort.InferenceSession(str(fixed)).get_inputs()[0].shape == [3, 3, 64, 96]
    assert "a fixed batch of 3" in capsys.readouterr().out
    for args, message in ((["--batch", "0"], "--batch 0: give a whole number"),
                          (["--batch", "two"], "or 'dynamic'"),
                          (["--batch", "2", "--size", "64x96"], "--size: --from .* only re-declares"),
                          (["--batch", "2", "--dynamic"], "--dynamic frees the batch already")):
        assert main(["export", "onnx", "--from", str(small_onnx), *args, "-o", str(tmp_path / "x.onnx")]) == 2
        assert __import__("re").search(message, capsys.readouterr().err), message
    assert not (tmp_path / "x.onnx").exists()


def test_tensorrt_default_profile_covers_the_batch_of_a_batch_only_dynamic_onnx():
    profile, default = resolve_profile("input", ["batch", 3, 64, 96])
    assert default and (profile.min, profile.opt, profile.max) == ((1, 3, 64, 96), (4, 3, 64, 96), (8, 3, 64, 96))


def test_files_through_one_backend_lose_no_frame_keep_order_and_match_single_stream(
        tmp_path, batch_onnx, small_onnx, clips, video_frames, capsys):
    a, b = clips
    synthetic = "test://96x64?frames=11"
    rc = main(["run", "--model", str(batch_onnx), "--source", str(a), "--source", str(b), "--source", synthetic,
               "--output", str(tmp_path / "out_{i}.mp4"), "--labels", str(tmp_path / "masks_{i}"),
               "--json", str(tmp_path / "stats.json"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    stats = json.loads((tmp_path / "stats.json").read_text())
    lengths = (14, 9, 11)
    for i, n in enumerate(lengths):
        stream = stats["streams"][i]
        assert (stream["frames_in"], stream["frames_out"], stream["dropped"]) == (n, n, 0)
        assert len(video_frames(tmp_path / f"out_{i}.mp4")) == n  # every frame written, decodable
        assert f"stream {i}: wrote {tmp_path / f'out_{i}.mp4'} ({n} frames)" in out
    # Batching happened, as the backend counted it: fewer inferences than frames. (How full the
    # batches get depends on the streams' writing keeping up with this small model; the counts
    # of full batches are checked without outputs below.)
    counts = stats["backend_counts"]
    assert counts["items"] == sum(lengths) and counts["calls"] < counts["items"] and counts["largest_batch"] >= 2

    # Each stream's masks, in order, equal a single-stream run of the batch-1 model on the same source.
    for i, spec in enumerate((str(a), str(b), synthetic)):
        assert main(["run", "--model", str(small_onnx), "--source", spec, "--labels", str(tmp_path / f"ref_{i}"),
                     "--quiet"]) == 0
        got, want = masks(tmp_path / f"masks_{i}"), masks(tmp_path / f"ref_{i}")
        assert len(got) == len(want) == lengths[i]
        assert len({m.tobytes() for m in want}) > 1, "the reference masks do not change from frame to frame"
        for k, (g, w) in enumerate(zip(got, want)):
            assert g.shape == w.shape and (g == w).mean() > 0.999, (i, k)


def test_batching_is_counted_by_the_backend_and_a_fixed_batch_is_padded(batch_onnx, small_onnx, tmp_path):
    def run(model, count, **kw):
        backend = open_backend(model, threads=1)
        sources = [open_source(f"test://96x64?frames={6 + i}") for i in range(count)]
        # Every stream of a file always has a frame ready: told to wait for them long enough, the
        # batches are full however busy the machine is (by default they wait a few ms).
        stats = MultiStream(sources, backend, view=None, max_wait_ms=5000, **kw).run()
        assert [s.stats.frames_out for s in stats.streams] == [6 + i for i in range(count)]
        return backend, stats

    backend, stats = run(batch_onnx, 4)
    assert backend.counts.largest_batch == 4 and backend.counts.calls < backend.counts.items == 6 + 7 + 8 + 9
    assert "batches of up to one frame per stream" in stats.summary()

    backend, stats = run(batch_onnx, 4, max_batch=2)  # the cap holds
    assert backend.counts.largest_batch == 2

    backend, stats = run(batch_onnx, 4, instances=2)  # two inferences at once: the streams shared out, two each
    assert backend.counts.largest_batch == 2 and backend.counts.items == 6 + 7 + 8 + 9
    assert "2 at once" in stats.summary()

    backend, stats = run(small_onnx, 3)  # fixed at one frame: one by one through the same backend
    assert backend.counts.largest_batch == 1 and backend.counts.calls == backend.counts.items == 6 + 7 + 8
    assert "one frame per inference" in stats.summary()

    fixed = tmp_path / "b2.onnx"
    assert main(["export", "onnx", "--from", str(small_onnx), "--batch", "2", "-o", str(fixed)]) == 0
    backend, stats = run(fixed, 3)  # exactly 2 per call: a lone frame is padded with a copy
    assert backend.counts.largest_batch == 2 and backend.counts.items == 2 * backend.counts.calls
    assert stats.batches.padded == backend.counts.items - (6 + 7 + 8)


def test_mosaic_tiles_the_streams_one_picture_per_batch(tmp_path, batch_onnx, clips, video_frames, capsys):
    a, _ = clips
    rc = main(["run", "--model", str(batch_onnx), "--source", str(a), "--source", "test://96x64?frames=5",
               "--mosaic", str(tmp_path / "all.mp4"), "--output", str(tmp_path / "s_{i}.avi"), "--quiet",
               "--json", str(tmp_path / "stats.json")])
    assert rc == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    mosaic = video_frames(tmp_path / "all.mp4")
    assert len(mosaic) == stats["mosaic_frames"] == stats["batches"]["batches"] >= 14
    assert mosaic[0].shape == (96, 2 * 128, 3)  # two tiles side by side at the first stream's size
    first = video_frames(tmp_path / "s_0.avi")
    second = video_frames(tmp_path / "s_1.avi")
    # The left tile is stream 0's picture (its title aside), every frame of it in order; the right tile
    # keeps stream 1's last picture once that stream has ended.
    def diff(x, y):
        return np.abs(x[:80].astype(int) - y[:80].astype(int)).mean()

    for k in (0, 7, 13):  # nearest to stream 0's own picture k of all its pictures (both videos are lossy)
        left = mosaic[k][:, :128]
        assert diff(left, first[k]) < 25 and diff(left, first[k]) == min(diff(left, f) for f in first), k
    right = mosaic[-1][:, 128:]
    assert diff(right, cv2.resize(second[-1], (128, 96))) == min(diff(right, cv2.resize(f, (128, 96))) for f in second)


def test_a_slow_stream_gets_every_frame_and_the_fast_one_is_not_held_back(batch_onnx):
    backend = open_backend(batch_onnx, threads=1)
    backend.infer(np.zeros((2, 3, 64, 96), np.float32))  # ONNX Runtime's first run is slow: not the streams' concern
    fast, slow = open_source("test://96x64?fps=30"), open_source("test://96x64?fps=5")
    run = MultiStream([fast, slow], backend, [[Sink()], [Sink()]])
    timer = threading.Timer(3.0, run.stop)
    timer.start()
    stats = run.run()
    timer.cancel()
    f, s = stats.streams[0].stats, stats.streams[1].stats
    assert s.frames_out >= 10 and s.dropped == 0 and s.frames_out == s.frames_in  # every slow frame, none dropped
    assert f.frames_out >= 3 * s.frames_out  # the fast one ran at its own pace, not the slow one's
    assert stats.batches.sizes.get(2, 0) <= s.frames_out  # a batch holds at most one frame per stream


def test_a_dropped_live_stream_reconnects_while_the_other_keeps_flowing(http_server, tmp_path, batch_onnx):
    server = http_server(tmp_path, fps=15, size=(96, 64))
    live = open_source(server.live_url, reopen_delay=0.2, reopen_max_delay=0.5, reopen_attempts=100,
                       timeout_ms=2000)
    other = open_source("test://96x64?fps=15")
    arrivals: dict[int, list[float]] = {0: [], 1: []}
    run = MultiStream([live, other], open_backend(batch_onnx, threads=1), [[Sink()], [Sink()]],
                      on_result=lambda i, r: arrivals[i].append(time.monotonic()), handle_signals=False)
    thread = threading.Thread(target=run.run)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while len(arrivals[0]) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(arrivals[0]) >= 5, "the HTTP stream never delivered"
        server.kill()
        killed = time.monotonic()
        time.sleep(3.0)  # the camera is away: stream 0 reconnects with back-off meanwhile
        during = [t for t in arrivals[1] if t > killed + 0.5]
        assert len(during) >= 15, "the test:// stream stalled while the HTTP stream was down"
        assert len([t for t in arrivals[0] if t > killed + 1.0]) == 0
        server.start()
        restarted = time.monotonic()
        while not [t for t in arrivals[0] if t > restarted] and time.monotonic() < restarted + 20:
            time.sleep(0.05)
        assert [t for t in arrivals[0] if t > restarted], "the HTTP stream did not come back"
    finally:
        run.stop()
        thread.join(timeout=20)
    assert live.reopens >= 1


def test_a_stream_whose_output_fails_ends_alone(batch_onnx, tmp_path):
    class Failing(Sink):
        spec = "failing"

        def write(self, frame, labels, rendered, name=None):
            raise OSError("disk full")

    backend = open_backend(batch_onnx, threads=1)
    good = open_sink(f"labels:{tmp_path / 'good'}")
    stats = MultiStream([open_source("test://96x64?frames=8"), open_source("test://96x64?frames=8")], backend,
                        [[good], [Failing()]]).run()
    assert stats.streams[0].error is None and stats.streams[0].stats.frames_out == 8
    assert isinstance(stats.streams[1].error, OSError)
    assert len(list((tmp_path / "good").glob("*.png"))) == 8


def test_cli_errors_for_several_sources(tmp_path, small_onnx, capsys):
    two = ["--source", "test://96x64?frames=2", "--source", "test://96x64?frames=2"]
    cases = [
        (["run", *two, "--output", str(tmp_path / "out.mp4")], r"--output .*out.mp4: 2 sources would all write into "
         r"this one video; put \{i\} in the name .*out_\{i\}.mp4 writes .*out_0.mp4.* or use --mosaic"),
        (["run", *two, "--labels", str(tmp_path / "masks")], r"put \{i\} in the name .*masks_\{i\}"),
        (["run", "--model", str(small_onnx), *two, "--max-batch", "2"], r"--max-batch 2: .* takes at most 1 frames "
         r"per inference; free its batch axis with `dilseg export onnx --from .* --batch dynamic`"),
        (["run", *two, "--source", str(tmp_path / "missing.mp4")], r"--source #2 \(.*missing.mp4\): .*no such file"),
        (["bench", *two, "--max-batch", "0"], r"--max-batch 0: must be 1 or more"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert __import__("re").search(message, err), (message, err)
    assert not list(tmp_path.iterdir())


def test_bench_with_several_sources_reports_streams_and_batched_inference(tmp_path, batch_onnx, capsys):
    out = tmp_path / "bench.json"
    src = "test://96x64?live=0"
    assert main(["bench", "--model", str(batch_onnx), "--source", src, "--source", src, "--source", src,
                 "--frames", "8", "--warmup", "2", "--json", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "raw inference, p50: one frame" in text and "a batch of 3" in text
    data = json.loads(out.read_text())
    assert [s["frames_out"] for s in data["streams"]] == [10, 10, 10]
    assert data["raw"]["batch"] == 3 and data["raw"]["batch_ms_per_frame"] > 0
    assert data["backend_counts"]["largest_batch"] >= 2


def test_demo_server_cameras_on_one_model_share_one_backend_and_batch(batch_onnx):
    from dilseg.demo import shared_camera

    segmenter = Segmenter(open_backend(batch_onnx, threads=1))
    # Cameras faster than this small model: each always has a frame waiting, so batches form
    # whatever the machine's load (slow cameras rarely have frames ready at the same moment).
    specs = ["test://96x64?fps=500", "test://80x64?fps=500", "test://64x48?fps=500"]
    try:
        workers = [shared_camera.acquire(spec, segmenter) for spec in specs]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all((w.latest() and w.latest().seq >= 10) for w in workers):
            time.sleep(0.05)
        assert all(w.latest() is not None and w.latest().seq >= 10 for w in workers), \
            [w.stats() for w in workers]
        assert len({id(w.segmenter.batcher) for w in workers}) == 1  # one Batcher on the one backend
        counts = segmenter.backend.counts
        assert counts.largest_batch >= 2 and counts.calls < counts.items  # frames of several sources per inference
        assert shared_camera.acquire(specs[0], segmenter) is workers[0]  # the page asking again changes nothing
    finally:
        shared_camera.stop_all()
        segmenter.close()
