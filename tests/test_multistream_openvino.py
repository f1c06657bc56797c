"""Several sources on the OpenVINO backend (the real openvino runtime on the CPU): which hint a
multi-stream run takes by default, a batch of the streams' frames run as parallel requests with
the labels each stream gets alone, and a clear refusal of --instances."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from dilseg.runtime.backends import open_backend
from dilseg.runtime.cli import main
from dilseg.runtime.cli_multistream import stream_defaults
from dilseg.runtime.defaults import default_model_path
from dilseg.runtime.multistream import MultiStream
from dilseg.runtime.sources import open_source
from dilseg.runtime.sources import test_frame as synthetic_frame

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'dilseg[openvino]')")


@pytest.fixture(scope="module")
def clip(tmp_path_factory, write_video) -> Path:
    return write_video(tmp_path_factory.mktemp("clip") / "a.avi", [synthetic_frame(i * 7, 96, 64) for i in range(8)],
                       fps=10, fourcc="MJPG")


def hint_for(model, backend: str = "openvino", ov_hint: str | None = None) -> str | None:
    args = argparse.Namespace(backend=backend, ov_hint=ov_hint)
    stream_defaults(args, Path(model))
    return args.ov_hint


def masks(folder: Path) -> list[np.ndarray]:
    return [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(folder.glob("*.png"))]


def parallel_requests(model: Path) -> int:
    backend = open_backend(model, "openvino", ov_hint="throughput", ov_precision="f32", log=lambda _: None)
    try:
        return backend.batch_range()[1]
    finally:
        backend.close()


def test_several_streams_take_the_throughput_hint_on_a_graph_fixed_at_one_frame(small_onnx, batch_onnx):
    assert hint_for(small_onnx) == "throughput"
    assert hint_for(batch_onnx) is None  # a free batch axis runs as one request on every core
    assert hint_for(small_onnx, ov_hint="latency") == "latency"  # what the command line says stays
    assert hint_for(small_onnx, backend="onnxruntime") is None
    # auto: the shipped model goes to OpenVINO on a CPU with AMX (runtime/autoselect.py), and then
    # gets the hint; elsewhere it runs on ONNX Runtime, which has no hint.
    from dilseg.runtime.autoselect import pick

    on_openvino = pick(default_model_path()).backend == "openvino"
    assert hint_for(default_model_path(), backend="auto") == ("throughput" if on_openvino else None)


def test_a_batch_of_streams_runs_as_parallel_requests_with_each_streams_own_labels(small_onnx):
    width = parallel_requests(small_onnx)
    if width < 2:
        pytest.skip("OpenVINO runs one request at a time on this CPU (a single core)")
    backend = open_backend(small_onnx, "openvino", ov_hint="throughput", ov_precision="f32", log=lambda _: None)
    alone = open_backend(small_onnx, "openvino", ov_hint="latency", ov_precision="f32", log=lambda _: None)
    got: dict[int, list[np.ndarray]] = {}
    try:
        count = width + 1  # more streams than requests: the batches are capped at the requests
        sources = [open_source(f"test://96x64?frames={5 + i}") for i in range(count)]
        run = MultiStream(sources, backend, view=None, max_wait_ms=5000,
                          on_result=lambda i, r: got.setdefault(i, []).append((r.frame, r.labels)))
        stats = run.run()
        assert [s.stats.frames_out for s in stats.streams] == [5 + i for i in range(count)]
        assert backend.counts.largest_batch == width and backend.counts.items == sum(5 + i for i in range(count))
        assert f"batches of up to {width}" in stats.summary()
        from dilseg.runtime.segmenter import Segmenter

        single = Segmenter(alone)
        for i in range(count):
            for frame, labels in got[i]:
                assert np.array_equal(labels, single(frame).labels), f"stream {i}"
    finally:
        backend.close()
        alone.close()


def test_cli_several_files_on_openvino_lose_no_frame_and_match_one_stream(small_onnx, clip, tmp_path):
    rc = main(["run", "--model", str(small_onnx), "--backend", "openvino", "--ov-precision", "f32",
               "--source", str(clip), "--source", "test://96x64?frames=6", "--labels", str(tmp_path / "m_{i}"),
               "--json", str(tmp_path / "stats.json"), "--quiet"])
    assert rc == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert [s["frames_out"] for s in stats["streams"]] == [8, 6]
    assert stats["backend_counts"]["items"] == 14
    assert stats["batching"].startswith("batches of up to") or parallel_requests(small_onnx) < 2
    assert "at once" not in stats["batching"]  # two streams fill one batch: one batch at a time
    for i, source in enumerate((str(clip), "test://96x64?frames=6")):
        assert main(["run", "--model", str(small_onnx), "--backend", "openvino", "--ov-precision", "f32",
                     "--ov-hint", "latency", "--source", source, "--labels", str(tmp_path / f"alone_{i}"),
                     "--quiet"]) == 0
        multi, alone = masks(tmp_path / f"m_{i}"), masks(tmp_path / f"alone_{i}")
        assert len(multi) == len(alone) > 0
        assert all(np.array_equal(a, b) for a, b in zip(multi, alone)), f"stream {i}"


def test_instances_on_openvino_run_two_batches_at_once(small_onnx, tmp_path, capsys):
    """The backend lends each call requests of its own, so two callers never meet "Infer Request
    is busy": --instances 2 segments every frame of both streams."""
    from dilseg.runtime.batching import concurrent_infer

    with open_backend(small_onnx, "openvino", ov_precision="f32", log=lambda _: None) as backend:
        assert concurrent_infer(backend)
    rc = main(["run", "--model", str(small_onnx), "--backend", "openvino", "--ov-precision", "f32", "--instances", "2",
               "--source", "test://96x64?frames=5", "--source", "test://96x64?frames=7",
               "--labels", str(tmp_path / "m_{i}"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert [len(masks(tmp_path / f"m_{i}")) for i in range(2)] == [5, 7]


def test_two_batches_at_once_by_default_where_openvino_lends_requests_per_call(small_onnx):
    from dilseg.runtime.batching import concurrent_infer, default_instances

    quiet = {"ov_precision": "f32", "log": lambda _: None}
    backends = [open_backend(small_onnx, "openvino", ov_hint="throughput", **quiet),
                open_backend(small_onnx, "openvino", ov_hint="latency", **quiet),
                open_backend(small_onnx, "onnxruntime", threads=1)]
    try:
        parallel, latency, onnxruntime = backends
        width = parallel.batch_range()[1]
        assert concurrent_infer(parallel) and width > 1
        assert default_instances(parallel, width + 1) == 2
        assert default_instances(parallel, width) == 1  # one batch holds every stream: batched, not split
        assert default_instances(latency, 8) == 1  # one request on every core: nothing to interleave
        assert default_instances(onnxruntime, 8) == 1
    finally:
        for backend in backends:
            backend.close()
