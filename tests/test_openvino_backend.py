"""The OpenVINO backend with the real openvino runtime on the CPU: same labels as ONNX Runtime,
precision and hints, the compiled-model cache, the ArgMax rewrite, stage timings, the CLI, and
a clear error when openvino is not installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from dilseg.runtime.artifact import read_meta
from dilseg.runtime.backends import BackendError, open_backend
from dilseg.runtime.dataset import SegmentationDataset
from dilseg.runtime.defaults import default_model_path
from dilseg.runtime.errors import DilsegError
from dilseg.runtime.preprocess import preprocess

from precision_helpers import CAMVID, needs_camvid, tiny_onnx

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'dilseg[openvino]')")
from dilseg.runtime.autoselect import VNNI_FLAGS, cpu_facts  # noqa: E402
from dilseg.runtime.backends.openvino_backend import (int8_weight_peak, rewrite_argmax,  # noqa: E402
                                                      saturation_warning, shared_core)

SHIPPED = default_model_path()


def dilseg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dilseg.runtime.cli", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    data = SegmentationDataset(CAMVID, "val")
    return [data.read_image(i) for i in (0, 40, 80)]


@needs_camvid
def test_f32_labels_are_onnx_runtimes(frames, tmp_path) -> None:
    sess = ort.InferenceSession(str(SHIPPED), providers=["CPUExecutionProvider"])
    meta = read_meta(SHIPPED)
    with open_backend(SHIPPED, "openvino", ov_precision="f32", ov_cache=str(tmp_path), log=lambda _: None) as be:
        assert be.name == "openvino" and be.precision == "f32" and be.argmax_rewritten == 1
        for frame in frames:
            x = preprocess(frame, meta)
            labels = be.infer(x)
            want = sess.run(None, {"input": x})[0]
            assert labels.shape == want.shape == (1, 360, 480) and labels.dtype == np.int32
            assert (labels == want).mean() >= 0.9999
            assert set(be.last_timings) == {"ov_infer", "ov_output"} and be.last_timings["ov_infer"] > 0


@needs_camvid
@pytest.mark.parametrize("color_order", ["RGB", "BGR"])
def test_frames_normalised_inside_the_graph_give_the_labels_of_preprocess(frames, tmp_path, color_order) -> None:
    """infer_frame (OpenCV resize, then u8 -> float, colour order, mean/std and layout inside
    OpenVINO's graph) against infer(preprocess(frame)), at the model's size and at 720x960,
    for a model of either colour order with its own mean/std."""
    import cv2

    from dilseg.export.onnx_meta import attach_metadata
    from dilseg.runtime.segmenter import Segmenter

    model = onnx.load(str(SHIPPED))
    meta = read_meta(SHIPPED)
    if color_order == "BGR":
        meta = meta.__class__(**{**meta.__dict__, "color_order": "BGR", "mean": (0.4, 0.5, 0.6),
                                 "std": (0.3, 0.2, 0.25)})
    attach_metadata(model, meta)
    path = tmp_path / f"m_{color_order}.onnx"
    onnx.save(model, str(path))
    with open_backend(path, "openvino", ov_precision="f32", ov_cache=str(tmp_path), log=lambda _: None) as be:
        assert be.capabilities.frame_input and be.meta.color_order == color_order
        for frame in frames + [cv2.resize(frames[0], (960, 720), interpolation=cv2.INTER_LINEAR)]:
            want = be.infer(preprocess(frame, be.meta))
            got = be.infer_frame(frame)
            assert got.shape == want.shape and got.dtype == want.dtype
            assert (got == want).mean() >= 0.9999, "the in-graph normalisation differs from preprocess"
            assert set(be.last_timings) == {"host_preprocess", "ov_infer", "ov_output"}
        # The Segmenter takes the frame path and reports the resize as its preprocess stage.
        result = Segmenter(be).process(frames[1])
        assert result.timings["preprocess"] == be.last_timings["host_preprocess"]
        assert (result.labels == be.infer(preprocess(frames[1], be.meta))[0]).mean() >= 0.9999
        with pytest.raises(BackendError, match="BGR uint8"):
            be.infer_frame(frames[0].astype(np.float32))


def test_a_refused_input_gives_its_requests_back(tmp_path) -> None:
    """A tensor OpenVINO refuses is a one-line BackendError, and the requests it took are
    handed back: the next calls (more refused ones, then a batch on the throughput hint) still
    run instead of waiting forever for a request."""
    import threading

    meta = read_meta(SHIPPED)
    x = preprocess(np.zeros((360, 480, 3), np.uint8), meta)
    for hint in ("latency", "throughput"):
        with open_backend(SHIPPED, "openvino", ov_precision="f32", ov_hint=hint, ov_cache=str(tmp_path),
                          log=lambda _: None) as be:
            outcome: list = []

            def calls() -> None:
                for _ in range(len(be.requests) + 1):
                    with pytest.raises(BackendError, match="OpenVINO cannot run this input"):
                        be.infer(x[:, :, :100])
                outcome.append(be.infer(np.concatenate([x] * len(be.requests))))

            worker = threading.Thread(target=calls, daemon=True)
            worker.start()
            worker.join(120)
            assert outcome, f"{hint}: a call after a refused input hung (or failed: see above)"
            assert outcome[0].shape == (len(be.requests), 360, 480)


def argmax_graph(path: Path) -> Path:
    """ArgMax over channels of the input itself, then Cast: the label head's tail alone."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 3, 5])
    y = helper.make_tensor_value_info("labels", TensorProto.INT32, [1, 3, 5])
    nodes = [helper.make_node("ArgMax", ["input"], ["a"], axis=1, keepdims=0),
             helper.make_node("Cast", ["a"], ["labels"], to=TensorProto.INT32)]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]),
              str(path))
    return path


SIGNAL_AFTER_BACKENDS = """
import gc, os, signal, sys, threading
from dilseg.runtime.backends import open_backend
model, cache = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGUSR1, lambda *_: print("handled", flush=True))
def opened():
    return open_backend(model, "openvino", ov_precision="f32", ov_cache=cache, log=lambda _: None)
# Closed in the order opened, and one opened on another thread but closed here: what a
# pipeline, the demo's workers and a multi-stream run do.
a, b = opened(), opened()
box = []
t = threading.Thread(target=lambda: box.append(opened()))
t.start(); t.join()
a.close(); b.close(); box[0].close()
del a, b, box
gc.collect()
os.kill(os.getpid(), signal.SIGUSR1)
print("alive", flush=True)
"""


def test_backends_closed_in_any_order_leave_signal_handling_intact(small_onnx, tmp_path) -> None:
    # OpenVINO's CPU plugin swaps the signal stack of the thread that starts it and frees it
    # when its Core goes; Cores freed out of order left the main thread's signal stack freed,
    # and the next Python signal handler (Ctrl-C, SIGTERM) died with SIGSEGV.
    r = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_BACKENDS, str(small_onnx), str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"rc {r.returncode}: {r.stderr[-2000:]}"
    assert r.stdout.split() == ["handled", "alive"]


def test_argmax_rewrite_picks_the_first_maximum_like_onnx(tmp_path) -> None:
    path = argmax_graph(tmp_path / "argmax.onnx")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, (1, 4, 3, 5)).astype(np.float32)  # many ties between channels
    x[0, :, 0, 0] = 7.0  # all four equal: the first wins
    core = shared_core()
    model = core.read_model(str(path))
    assert rewrite_argmax(model) == 1
    assert "TopK" not in [op.get_type_name() for op in model.get_ordered_ops()]
    got = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request().infer({0: x})[0]
    assert np.array_equal(got, x.argmax(1).astype(np.int32))
    plain = core.compile_model(str(path), "CPU").create_infer_request().infer({0: x})[0]
    assert np.array_equal(got, plain)


def test_a_topk_whose_values_are_used_is_left_alone(tmp_path) -> None:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 3])
    k = helper.make_tensor("k", TensorProto.INT64, [1], [1])
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in (("v", TensorProto.FLOAT), ("i", TensorProto.INT64))]
    graph = helper.make_graph([helper.make_node("TopK", ["input", "k"], ["v", "i"], axis=1)], "g", [x], outs, [k])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "topk.onnx"))
    model = ov.Core().read_model(str(tmp_path / "topk.onnx"))
    assert rewrite_argmax(model) == 0


@needs_camvid
def test_bf16_and_the_throughput_hint(frames, tmp_path) -> None:
    meta = read_meta(SHIPPED)
    xs = [preprocess(f, meta) for f in frames]
    with open_backend(SHIPPED, "openvino", ov_precision="f32", ov_cache=str(tmp_path), log=lambda _: None) as f32:
        ref = [f32.infer(x) for x in xs]
    notes = []
    with open_backend(SHIPPED, "openvino", ov_precision="bf16", ov_cache=str(tmp_path), log=notes.append) as bf16:
        if "BF16" in shared_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            assert bf16.precision == "bf16" and not any("cannot run" in n for n in notes)
        else:  # OpenVINO runs f32 on a CPU without bf16, and the backend says so
            assert bf16.precision == "f32"
            assert any("CPU cannot run bf16 here" in n and "it runs f32" in n for n in notes), notes
        assert np.mean([(bf16.infer(x) == r).mean() for x, r in zip(xs, ref)]) >= 0.99
    with open_backend(SHIPPED, "openvino", ov_precision="f32", ov_hint="throughput", ov_cache=str(tmp_path),
                      log=lambda _: None) as tp:
        low, high = tp.batch_range()
        assert low == 1 and high >= 1
        n = min(high, len(xs))
        batch = tp.infer(np.concatenate(xs[:n]))  # the frames run as parallel requests
        assert batch.shape == (n, 360, 480)
        for i in range(n):
            assert np.array_equal(batch[i], ref[i][0])
        if high < len(xs):
            with pytest.raises(BackendError, match="at most"):
                tp.infer(np.concatenate(xs))


def test_compiled_model_cache_is_keyed_by_the_onnx_and_says_what_happened(tmp_path) -> None:
    messages: list[str] = []
    model = tmp_path / "m.onnx"
    shutil.copy(SHIPPED, model)
    cache = tmp_path / "cache"
    open_backend(model, "openvino", ov_precision="f32", ov_cache=str(cache), log=messages.append).close()
    assert "compiled in" in messages[-1] and "no cached compiled model yet" in messages[-1]
    folders = list(cache.iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("m-")
    assert any(p.suffix == ".blob" for p in folders[0].iterdir())
    open_backend(model, "openvino", ov_precision="f32", ov_cache=str(cache), log=messages.append).close()
    assert messages[-1].startswith("OpenVINO: reusing the compiled model cached in")
    # Without its blobs, a recompile at another precision says what changed since the last one.
    for blob in folders[0].glob("*.blob"):
        blob.unlink()
    open_backend(model, "openvino", ov_precision="bf16", ov_cache=str(cache), log=messages.append).close()
    assert any("the precision changed (f32 -> bf16)" in m for m in messages[-2:])
    # Another ONNX (here: the same graph with other metadata) gets its own folder.
    proto = onnx.load(str(model))
    proto.doc_string = "changed"
    onnx.save(proto, str(model))
    open_backend(model, "openvino", ov_precision="f32", ov_cache=str(cache), log=messages.append).close()
    assert len(list(cache.iterdir())) == 2 and "no cached compiled model yet" in messages[-1]


def test_bad_options_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(BackendError, match="--ov-precision f64: choose one of f32, bf16, f16"):
        open_backend(SHIPPED, "openvino", ov_precision="f64")
    with pytest.raises(BackendError, match="--ov-hint fast"):
        open_backend(SHIPPED, "openvino", ov_hint="fast")
    with pytest.raises(BackendError, match="OpenVINO option.*--backend openvino"):
        open_backend(SHIPPED, "onnxruntime", ov_precision="bf16")
    with pytest.raises(BackendError, match="--ov-device NPU9: not available here"):
        open_backend(SHIPPED, "openvino", ov_device="NPU9", ov_cache=str(tmp_path))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(DilsegError, match="not a loadable ONNX model"):
        open_backend(bad, "openvino", ov_cache=str(tmp_path))


def test_cli_run_bench_and_eval_on_openvino(tmp_path) -> None:
    r = dilseg("run", "--backend", "openvino", "--ov-precision", "f32", "--ov-cache", str(tmp_path),
               "--source", "test://480x360?frames=12", "--max-frames", "12", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "(openvino)" in r.stderr and "OpenVINO: compiled in" in r.stderr
    assert "ov_infer" in r.stdout and "end-to-end" in r.stdout
    r = dilseg("bench", "--backend", "openvino", "--ov-cache", str(tmp_path), "--source", "test://480x360?frames=40",
               "--frames", "15", "--warmup", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "backend openvino" in r.stdout and "ov_infer" in r.stdout
    if (CAMVID / "val").is_dir():
        r = dilseg("eval", "--backend", "openvino", "--ov-precision", "f32", "--data", str(CAMVID), "--limit", "3",
                   "--no-progress")
        assert r.returncode == 0, r.stderr
        assert "mIoU" in r.stdout


def test_saturation_warning_is_for_8_bit_weights_on_x86_cpus_without_vnni() -> None:
    avx2 = frozenset({"sse2", "ssse3", "avx2", "fma"})
    warning = saturation_warning(127, "CPU", avx2)
    assert "8-bit weights" in warning and "no VNNI" in warning and "--backend onnxruntime" in warning
    assert saturation_warning(128, "CPU", avx2 | {"avx512f"})  # AVX-512 without VNNI saturates too
    for peak, device, flags in ((64, "CPU", avx2), (None, "CPU", avx2), (127, "CPU", avx2 | {"avx512_vnni"}),
                                (127, "CPU", avx2 | {"avx_vnni"}), (127, "GPU", avx2),
                                (127, "CPU", frozenset({"fp", "asimd", "asimddp"}))):  # not x86
        assert saturation_warning(peak, device, flags) is None, (peak, device, flags)


def test_int8_weight_peak_reads_both_forms_of_quantised_weights(tmp_path) -> None:
    from test_ort_options import saturating_int8_graph

    path = tmp_path / "saturating.onnx"
    path.write_bytes(saturating_int8_graph())
    core = shared_core()
    assert int8_weight_peak(core.read_model(str(path))) == 128  # int8 initialisers
    assert int8_weight_peak(core.read_model(str(SHIPPED))) is None  # fp32
    assert int8_weight_peak(core.read_model(str(SHIPPED.with_name("edge_m_camvid.int8cpu.onnx")))) <= 64


def test_seven_bit_int8_is_exact_in_openvino_on_this_cpu(tmp_path) -> None:
    """The premise of the cpu flavour's 7 bits, for real: OpenVINO's int8 products with weights
    within -64..64 equal the graph's definition on every x86 CPU (with 8 bits they do not on a
    CPU without VNNI, which the warning says)."""
    from test_ort_options import K, exact_result, saturating_int8_graph

    x = np.ones((1, 3, 8, K), np.float32)
    for weight in (64, -64):
        path = tmp_path / f"seven_bit_{weight}.onnx"
        path.write_bytes(saturating_int8_graph(weight))
        got = shared_core().compile_model(str(path), "CPU")({0: x})[0]
        np.testing.assert_array_equal(got, exact_result(x, weight))


@needs_camvid
def test_the_backend_warns_of_8_bit_weights_where_they_saturate(tmp_path_factory, tmp_path) -> None:
    """Real exports: the cpu flavour (7-bit) loads quietly everywhere; the tensorrt flavour
    (8-bit weights) warns on this CPU exactly when it has no VNNI."""
    saturates = not (VNNI_FLAGS & cpu_facts()[1]) and "ssse3" in cpu_facts()[1]
    for target, warns in (("cpu", False), ("tensorrt", saturates)):
        lines: list[str] = []
        model = tiny_onnx(tmp_path_factory, "int8", target)
        with open_backend(model, "openvino", ov_cache=str(tmp_path), log=lines.append) as be:
            assert (be.saturation_warning is not None) == warns, target
            assert any("8-bit weights" in line for line in lines) == warns, lines


def test_without_openvino_the_backend_says_how_to_install_it() -> None:
    code = ("import sys; sys.modules['openvino'] = None\n"
            "from dilseg.runtime.cli import main\n"
            "sys.exit(main(['run', '--backend', 'openvino', '--source', 'test://?frames=2', '--max-frames', '2']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "pip install 'dilseg[openvino]'" in r.stderr and "Traceback" not in r.stderr


def test_demo_lists_openvino() -> None:
    from dilseg.demo.loading import backend_options

    opt = {o.key: o for o in backend_options()}["openvino"]
    assert opt.backend == "openvino" and opt.reason is None
