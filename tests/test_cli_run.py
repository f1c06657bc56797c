"""`dilseg run`, `dilseg info`, `dilseg bench` on real files; SIGTERM/SIGINT leave a playable video."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from dilseg.runtime.backends import open_backend
from dilseg.runtime.bench import raw_inference
from dilseg.runtime.cli import main
from dilseg.runtime.defaults import default_model_path
from dilseg.runtime.preprocess import preprocess
from dilseg.runtime.segmenter import Segmenter
from dilseg.runtime.sinks import gui_available
from dilseg.runtime.sources import test_frame


def dilseg_proc(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dilseg.runtime.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_run_on_a_video_writes_video_labels_and_summary(tmp_path: Path, small_onnx, write_video, video_frames,
                                                        capsys) -> None:
    video = write_video(tmp_path / "in.mp4", [test_frame(i * 2, 128, 96) for i in range(15)], fps=10)
    rc = main(["run", "--model", str(small_onnx), "--source", str(video), "--output", str(tmp_path / "out.mp4"),
               "--labels", str(tmp_path / "masks"), "--view", "side-by-side", "--legend", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "frames in 15, out 15, dropped 0, corrupt skipped 0" in out
    for stage in ("capture", "preprocess", "infer", "postprocess", "render"):
        assert re.search(rf"^{stage}\s+\d+\.\d+\s+\d+\.\d+", out, re.M), stage
    assert "peak RSS" in out
    written = video_frames(tmp_path / "out.mp4")
    assert len(written) == 15 and written[0].shape == (96, 256, 3)  # side by side: twice as wide
    seg = Segmenter(open_backend(small_onnx))
    for i, frame in enumerate(video_frames(video)):
        mask = cv2.imread(str(tmp_path / "masks" / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(mask, seg(frame).labels)


@pytest.mark.parametrize("sig, rc", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_cleanly_and_the_video_is_playable(tmp_path: Path, small_onnx, sig, rc) -> None:
    out = tmp_path / "live.mp4"
    proc = dilseg_proc("run", "--model", str(small_onnx), "--source", "test://160x120?fps=60",
                       "--output", str(out), "--quiet")
    try:
        # Wait until frames are being written to the temporary file, then stop it.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            partial = [p for p in tmp_path.iterdir() if p.name.startswith(".live.")]
            if partial and partial[0].stat().st_size > 20000:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        else:
            pytest.fail("no frames were written within 60 s")
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == rc, stderr
    assert f"stopped by {sig.name}" in stdout
    assert [p.name for p in tmp_path.iterdir()] == ["live.mp4"]  # no temporary left behind
    reported = int(re.search(r"wrote .*live\.mp4 \((\d+) frames\)", stdout).group(1))
    cap = cv2.VideoCapture(str(out))
    assert cap.isOpened()
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == reported
    decoded = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        assert frame.shape == (120, 160, 3)
        decoded += 1
    assert decoded == reported > 0


@pytest.mark.parametrize("args, words", [
    (["--source", "missing.mp4"], "no such file or folder"),
    (["--source", "gopher://x"], "unknown source scheme"),
    (["--source", "42"], "no camera at index 42"),
    (["--source", "test://", "--output", "nowhere/out.mp4"], "does not exist"),
    (["--source", "test://", "--alpha", "1.5"], "--alpha"),
    (["--source", "test://", "--max-frames", "0"], "--max-frames"),
])
def test_run_errors_are_one_line_and_leave_nothing(tmp_path: Path, small_onnx, args, words, capsys,
                                                   monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "--model", str(small_onnx), *args])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Traceback" not in err
    assert err.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []


def test_run_with_a_missing_model(tmp_path: Path, capsys) -> None:
    assert main(["run", "--model", str(tmp_path / "nope.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
    if not default_model_path().exists():
        assert main(["run", "--max-frames", "1"]) == 2
        assert "pass --model" in capsys.readouterr().err


@pytest.mark.skipif(gui_available()[0], reason="this machine can show windows")
def test_show_without_a_display_is_a_clear_error(small_onnx, capsys) -> None:
    assert main(["run", "--model", str(small_onnx), "--show", "--max-frames", "1"]) == 2
    assert "cannot show a window" in capsys.readouterr().err


HAVE_TRT = subprocess.run([sys.executable, "-c", "import tensorrt"], capture_output=True).returncode == 0


@pytest.mark.parametrize("command", ["run", "bench"])
def test_tensorrt_options_are_checked_before_anything_runs(tmp_path: Path, small_onnx, command, capsys) -> None:
    # On ONNX Runtime a TensorRT option would be silently meaningless: refuse it.
    assert main([command, "--model", str(small_onnx), "--cuda-graph", "--fp16", "--source", "test://96x64?live=0"]) == 2
    err = capsys.readouterr().err
    assert "--cuda-graph, --fp16: TensorRT option(s)" in err and "--backend tensorrt" in err
    assert "Traceback" not in err
    # Build options cannot change an engine that is already built.
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"serialized engine bytes")
    assert main([command, "--model", str(engine), "--dla-core", "0", "--source", "test://96x64?live=0"]) == 2
    err = capsys.readouterr().err
    assert "--dla-core: build option(s)" in err and "pass the .onnx" in err


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here; the missing-TensorRT path cannot be exercised")
def test_tensorrt_options_reach_the_backend_which_says_what_is_missing(small_onnx, capsys) -> None:
    assert main(["run", "--model", str(small_onnx), "--backend", "tensorrt", "--cuda-graph", "--rebuild",
                 "--source", "test://96x64?live=0", "--max-frames", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs the tensorrt Python package" in err and "--backend onnxruntime" in err


def test_info_prints_the_metadata(small_onnx, small_onnx_dynamic, capsys) -> None:
    assert main(["info", str(small_onnx)]) == 0
    out = capsys.readouterr().out
    assert "edge_s" in out and "NCHW 64x96" in out and "labels" in out and "Road" in out
    assert "labels: tensor(int32) [1, 64, 96]" in out
    assert main(["info", str(small_onnx_dynamic), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["meta"]["input_size"] is None and len(data["meta"]["classes"]) == 11
    assert data["io"]["inputs"][0]["shape"][2:] == ["height", "width"]


def test_info_on_an_engine_reads_its_sidecar(tmp_path: Path, small_onnx, capsys) -> None:
    from dilseg.runtime.artifact import read_meta

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"serialized engine bytes")
    assert main(["info", str(engine)]) == 2
    assert "no sidecar" in capsys.readouterr().err
    meta = read_meta(small_onnx).to_dict()
    (tmp_path / "m.engine.json").write_text(json.dumps({"meta": meta, "tensorrt_version": "10.3.0",
                                                        "gpu": "Orin", "precision": "fp16"}))
    assert main(["info", str(engine)]) == 0
    out = capsys.readouterr().out
    assert "edge_s" in out and re.search(r"tensorrt_version\s+10\.3\.0", out) and re.search(r"gpu\s+Orin", out)


def test_bench_reports_stages_fps_ratio_and_memory(tmp_path: Path, small_onnx, capsys) -> None:
    report = tmp_path / "b.json"
    rc = main(["bench", "--model", str(small_onnx), "--source", "test://160x120?live=0", "--frames", "30",
               "--warmup", "5", "--json", str(report), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    for stage in ("capture", "preprocess", "infer", "postprocess", "render"):
        assert re.search(rf"^{stage}\s+\d+\.\d+\s+\d+\.\d+", out, re.M), stage
    for words in ("end-to-end FPS", "raw inference FPS", "end-to-end / raw", "peak RSS"):
        assert words in out
    data = json.loads(report.read_text())
    assert data["frames"] == 30 and data["pipeline"]["frames_out"] == 35
    assert data["ratio"] == pytest.approx(data["e2e_fps"] / data["raw_fps"])
    assert data["ratio"] > 0 and data["peak_rss_mib"] > 10
    assert data["raw_ms"]["p50"] <= data["raw_ms"]["p95"]


def test_bench_lists_backend_reported_stages(small_onnx) -> None:
    """A backend that declares ``stage_timings`` (TensorRT: gpu_upload/gpu_infer/...) gets its split listed."""
    from dilseg.runtime.backends import Capabilities
    from dilseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    class SplitTiming(OnnxRuntimeBackend):
        capabilities = Capabilities(stage_timings=True)

        def infer_impl(self, tensor):
            t0 = time.perf_counter()
            feed = np.ascontiguousarray(tensor)
            t1 = time.perf_counter()
            out = super().infer_impl(feed)
            t2 = time.perf_counter()
            self.last_timings = {"upload": (t1 - t0) * 1e3, "execute": (t2 - t1) * 1e3}
            return out

    split = SplitTiming(small_onnx, threads=1).load()
    fps, total, stages = raw_inference(split, preprocess(test_frame(0, 96, 64), split.meta), frames=20, warmup=2)
    assert fps > 0 and set(stages) == {"upload", "execute"}
    assert stages["execute"]["mean"] <= total["mean"] and stages["execute"]["n"] == 20


def test_bench_times_the_pipelines_call_with_and_without_the_cuda_graph(small_onnx, capsys) -> None:
    """The raw figure times the call the pipeline makes (infer_frame on a backend that takes frames,
    as TensorRT does), and with CUDA graphs on, the same call without them in interleaved rounds.
    The backend: ONNX Runtime declaring those capabilities, recording which mode served each call."""
    from dilseg.runtime.backends import Capabilities
    from dilseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from dilseg.runtime.bench import bench, graph_modes, pipeline_call
    from dilseg.runtime.sources import open_source

    class FramesAndGraphs(OnnxRuntimeBackend):
        capabilities = Capabilities(frame_input=True, cuda_graph=True)

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.graph, self.calls = True, []

        def infer_frame(self, frame_bgr):
            self.calls.append(("frame", self.graph))
            return self.infer(preprocess(frame_bgr, self.meta))

        def set_cuda_graph(self, on):
            self.graph = on

    plain = OnnxRuntimeBackend(small_onnx, threads=1).load()
    assert pipeline_call(plain, test_frame(0, 96, 64))[1] == "infer" and graph_modes(plain) == (None,)
    be = FramesAndGraphs(small_onnx, threads=1).load()
    assert graph_modes(be) == (None,)  # the option is off: timed as it runs
    object.__setattr__(be.options, "cuda_graph", True)  # as `--cuda-graph` sets it
    assert pipeline_call(be, test_frame(0, 96, 64))[1] == "infer_frame" and graph_modes(be) == (True, False)
    result = bench(open_source("test://96x64?live=0"), be, frames=20, warmup=2)
    raw = be.calls[22:]  # after the pipeline's 22 frames: every raw call went through infer_frame
    assert all(kind == "frame" for kind, _ in be.calls) and len(raw) == 2 * 2 + 2 * 20  # warm-up, timed per mode
    assert [g for _, g in raw[:4]] == [True, True, False, False]
    timed = raw[4:]
    assert sum(g for _, g in timed) == 20 and sum(not g for _, g in timed) == 20
    # rounds of 2 calls per mode, the order reversed every round
    assert [g for _, g in timed[:8]] == [True, True, False, False, False, False, True, True]
    assert be.graph is True  # left as it was
    assert result.raw_call == "infer_frame" and result.raw_without_graph["fps"] > 0
    assert result.graph_speedup == pytest.approx(result.raw_fps / result.raw_without_graph["fps"])
    report = result.report()
    assert "back-to-back backend.infer_frame, the pipeline's call" in report
    assert re.search(r"without the CUDA graph:\s+\d+\.\d+ .*interleaved.*gives \d+\.\d+x", report)
    assert re.search(r"^no CUDA graph\s+\d+\.\d+", report, re.M)
    be.close()
    plain.close()


@pytest.mark.parametrize("command", ["run", "info", "bench", "export onnx", "export triton", "train", "eval", "verify", "build", "demo"])
def test_help_teaches_with_examples(command: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main([*command.split(), "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and f"dilseg {command} " in out
