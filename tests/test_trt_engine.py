"""The TensorRT backend: clear errors where TensorRT/pycuda are missing (runs everywhere), and
build -> run -> parity with ONNX Runtime where they are present (marked gpu + tensorrt)."""

import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from dilseg.runtime.backends import BackendError, open_backend
from precision_helpers import CAMVID, needs_camvid

HAVE_TRT = subprocess.run([sys.executable, "-c", "import tensorrt"], capture_output=True).returncode == 0
HAVE_PYCUDA = subprocess.run([sys.executable, "-c", "import pycuda.driver"], capture_output=True).returncode == 0


def frames(n=4, h=120, w=160, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        base = np.stack([xx / w * 255, yy / h * 255, 128 + 90 * np.sin((xx + 9 * i) / 6)], -1)
        out.append(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


# -- without TensorRT / pycuda: the real import failures -----------------------------------------

@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here; the missing-TensorRT path cannot be exercised")
def test_missing_tensorrt_is_a_clear_backend_error(trt_onnx):
    with pytest.raises(BackendError) as err:
        open_backend(trt_onnx["fixed"], backend="tensorrt")
    msg = str(err.value)
    assert "needs the tensorrt Python package" in msg and "pip install 'dilseg[trt]'" in msg
    assert "JetPack" in msg and "--system-site-packages" in msg and "--backend onnxruntime" in msg


@pytest.mark.skipif(HAVE_PYCUDA, reason="pycuda is installed here")
def test_missing_pycuda_is_a_clear_backend_error():
    from dilseg.runtime.trt.deps import import_pycuda

    with pytest.raises(BackendError, match=r"needs pycuda, which is missing.*nvcc.*dilseg\[trt\]"):
        import_pycuda(BackendError)
    from dilseg.runtime.trt.kernels import import_pycuda as kernels_pycuda

    with pytest.raises(BackendError, match="kernels needs pycuda.*nvcc"):
        kernels_pycuda()


def test_backend_rejects_other_files(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"x")
    with pytest.raises(BackendError, match=r"TensorRT backend runs a .engine/.plan .* or an .onnx .*not a .pt file"):
        open_backend(tmp_path / "m.pt", backend="tensorrt")
    with pytest.raises(BackendError, match="no such model file"):
        open_backend(tmp_path / "none.engine", backend="tensorrt")


# -- with TensorRT and a GPU ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(gpu, trt_onnx, tmp_path_factory):
    from dilseg.runtime.trt.build import BuildOptions, build_engine

    path = tmp_path_factory.mktemp("engine") / "edge_s.engine"
    result = build_engine(trt_onnx["fixed"], path, BuildOptions(progress=False))
    return path, result


def ort_labels(onnx_path, tensor):
    from dilseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    with OnnxRuntimeBackend(onnx_path) as ort:
        return ort.infer(tensor)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_build_writes_engine_and_sidecar(engine, trt_onnx):
    import tensorrt as trt

    from dilseg.runtime.artifact import read_meta, read_onnx_meta
    from dilseg.runtime.files import sha256_file
    from dilseg.runtime.trt.compat import parse_version

    path, result = engine
    side = result.sidecar
    assert path.is_file() and side["engine_sha256"] == sha256_file(path)
    assert side["onnx_sha256"] == sha256_file(trt_onnx["fixed"]) and side["precision"] == "fp32"
    assert side["tensorrt_version"] == str(parse_version(trt.__version__))
    assert side["profile"]["min"] == [1, 3, 64, 96] and side["gpu_name"] and side["compute_capability"]
    assert [t["dtype"] for t in side["io"] if t["mode"] == "output"] == ["int32"]
    assert read_meta(path) == read_onnx_meta(trt_onnx["fixed"])
    assert result.seconds > 0


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_matches_onnxruntime(engine, trt_onnx):
    from dilseg.runtime.preprocess import preprocess

    path, _ = engine
    with open_backend(path, backend="tensorrt") as be:
        agree = total = 0
        for f in frames(6, 64, 96):
            x = preprocess(f, be.meta)
            got = be.infer(x)
            ref = ort_labels(trt_onnx["fixed"], x)
            assert got.shape == ref.shape == (1, 64, 96) and got.dtype == np.int32
            agree += int((got == ref).sum())
            total += got.size
            assert set(be.last_timings) == {"gpu_upload", "gpu_infer", "gpu_download"}
        # fp32 engine; TF32 (TensorRT's default on Ampere+) may flip near-tie pixels only.
        assert agree / total >= 0.995, f"agreement {agree / total:.4%}"


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_gpu_preprocess_and_render_match_cpu_path(engine):
    from dilseg.runtime.postprocess import postprocess, render
    from dilseg.runtime.preprocess import preprocess

    path, _ = engine
    with open_backend(path, backend="tensorrt") as be:
        for f in frames(3, 360, 480, seed=3):
            gpu_out = be.infer_frame(f)
            assert {"gpu_upload", "gpu_preprocess", "gpu_infer", "gpu_download"} <= set(be.last_timings)
            cpu_in = preprocess(f, be.meta)
            cpu_out = be.infer(cpu_in)
            # Same input up to OpenCV's rounding -> same labels on all but a handful of pixels.
            assert (gpu_out == cpu_out).mean() >= 0.999
            be.infer_frame(f)
            picture, big = be.render_last(alpha=0.5)
            labels = postprocess(gpu_out, be.meta, f.shape)
            np.testing.assert_array_equal(big, labels)
            assert np.abs(picture.astype(int) - render(f, labels, be.meta).astype(int)).max() <= 1


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_kernels_that_cannot_compile_fall_back_to_cpu_preprocessing(engine, monkeypatch):
    # No nvcc on PATH is the usual cause on a Jetson: pycuda's compiler then fails to start.
    import dilseg.runtime.trt.kernels as cp
    from dilseg.runtime.preprocess import preprocess

    def no_nvcc():
        raise OSError("nvcc: not found")

    monkeypatch.setattr(cp, "kernels", no_nvcc)
    messages = []
    path, _ = engine
    with open_backend(path, backend="tensorrt", log=messages.append) as be:
        f = frames(1, 360, 480, seed=5)[0]
        out = be.infer_frame(f)
        np.testing.assert_array_equal(out, be.infer(preprocess(f, be.meta)))
        be.infer_frame(f)  # the reason is logged once, not per frame
        assert len([m for m in messages if "GPU preprocessing unavailable" in m]) == 1
        assert "nvcc" in messages[-1] and "PATH" in messages[-1]
        with pytest.raises(BackendError, match="GPU rendering is unavailable"):
            be.render_last()


def test_graph_step_is_the_same_on_both_paths():
    """infer() and infer_frame() both ask graph_step (no 'upload' in it: infer_frame's call was never
    replayed when capture and replay required the host copy-in)."""
    import inspect

    from dilseg.runtime.trt.runner import TensorRTBackend, graph_step

    assert graph_step(True, captured=False, failed=False) == "capture"
    assert graph_step(True, captured=True, failed=False) == "replay"
    assert graph_step(True, captured=False, failed=True) == "plain"
    assert graph_step(False, captured=True, failed=False) == "plain"
    assert list(inspect.signature(graph_step).parameters) == ["enabled", "captured", "failed"]
    for method in (TensorRTBackend.infer_impl, TensorRTBackend.infer_frame):
        assert "self._run(bufs, upload=" in inspect.getsource(method)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_cuda_graph_gives_same_labels(engine):
    from dilseg.runtime.artifact import read_meta
    from dilseg.runtime.preprocess import preprocess

    path, _ = engine
    fs = frames(4, 64, 96, seed=5)
    xs = [preprocess(f, read_meta(path)) for f in fs]
    messages = []
    with open_backend(path, backend="tensorrt") as plain, \
            open_backend(path, backend="tensorrt", cuda_graph=True, log=messages.append) as g:
        # infer(): a shape's first call runs plainly and captures; the later ones replay the graph.
        for i, x in enumerate(xs):
            np.testing.assert_array_equal(g.infer(x), plain.infer(x))
            assert ("gpu_infer+download" in g.last_timings) == (i > 0), g.last_timings
        bufs = g._buffers[(1, 3, 64, 96)]
        assert bufs.graph_failed is None and not messages, (bufs.graph_failed, messages)
        assert bufs.graph is not None and bufs.replays == len(xs) - 1
        # infer_frame(), the pipeline's call: the same graph, after the preprocessing kernel.
        for f in fs:
            np.testing.assert_array_equal(g.infer_frame(f), plain.infer_frame(f))
            assert g.gpu_preprocess_error is None, g.gpu_preprocess_error
            assert {"gpu_preprocess", "gpu_infer+download"} <= set(g.last_timings), g.last_timings
        assert bufs.replays == 2 * len(xs) - 1
        # Switched off (bench's comparison): plain again, same labels, the graph kept.
        g.set_cuda_graph(False)
        np.testing.assert_array_equal(g.infer(xs[0]), plain.infer(xs[0]))
        assert "gpu_infer" in g.last_timings and bufs.replays == 2 * len(xs) - 1 and bufs.graph is not None


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_run_and_bench_use_the_graph_on_the_pipelines_path(engine, tmp_path):
    path, _ = engine
    source = "test://96x64?live=0&frames=12"
    r = subprocess.run([sys.executable, "-m", "dilseg.runtime.cli", "run", "--model", str(path), "--backend",
                        "tensorrt", "--cuda-graph", "--source", source, "--json", str(tmp_path / "run.json"),
                        "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import json

    stages = json.loads((tmp_path / "run.json").read_text())["stages_ms"]
    assert "gpu_infer+download" in stages and "gpu_preprocess" in stages, stages
    r = subprocess.run([sys.executable, "-m", "dilseg.runtime.cli", "bench", "--model", str(path), "--backend",
                        "tensorrt", "--cuda-graph", "--source", "test://96x64?live=0", "--frames", "40", "--warmup",
                        "5", "--json", str(tmp_path / "bench.json"), "--quiet"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["raw_call"] == "infer_frame"  # the pipeline's call, timed with and without the graph
    assert "gpu_infer+download" in data["pipeline"]["stages_ms"] and "gpu_infer+download" in data["raw_stages_ms"]
    assert "gpu_infer" in data["raw_without_graph"]["stages_ms"] and data["raw_without_graph"]["fps"] > 0
    assert "without the CUDA graph" in r.stdout and data["graph_speedup"] > 0


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_inference_in_a_worker_thread(engine):
    from dilseg.runtime.artifact import read_meta
    from dilseg.runtime.preprocess import preprocess

    path, _ = engine
    x = preprocess(frames(1, 64, 96)[0], read_meta(path))
    be = open_backend(path, backend="tensorrt")  # loaded here, used in another thread
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("labels", be.infer(x)))
    t.start()
    t.join()
    np.testing.assert_array_equal(out["labels"], be.infer(x))
    be.close()
    be.close()  # idempotent
    with pytest.raises(BackendError, match="not loaded"):
        be.infer(x)
    # Loaded in a worker thread and closed from this one: released here, and this thread's
    # current context is what it was before (the primary context is never left current by close).
    before = current_context()
    made = {}
    t = threading.Thread(target=lambda: made.setdefault("be", open_backend(path, backend="tensorrt")))
    t.start()
    t.join()
    np.testing.assert_array_equal(made["be"].infer(x), out["labels"])
    made["be"].close()
    assert made["be"]._ctx is None and current_context() == before


def current_context() -> int:
    import ctypes

    handle = ctypes.c_void_p()
    assert ctypes.CDLL("libcuda.so.1").cuCtxGetCurrent(ctypes.byref(handle)) == 0
    return handle.value or 0


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_damaged_or_foreign_engines_refused(engine, tmp_path):
    import json

    from dilseg.runtime.artifact import sidecar_path
    from dilseg.runtime.trt.cache import EngineError

    path, _ = engine
    cut = tmp_path / "cut.engine"
    cut.write_bytes(path.read_bytes()[:1000])
    shutil.copy(sidecar_path(path), sidecar_path(cut))
    with pytest.raises(EngineError, match="truncated"):
        open_backend(cut, backend="tensorrt")
    foreign = tmp_path / "foreign.engine"
    shutil.copy(path, foreign)
    side = json.loads(sidecar_path(path).read_text())
    side["tensorrt_version"] = "9.9.0"
    sidecar_path(foreign).write_text(json.dumps(side))
    with pytest.raises(EngineError, match="built with TensorRT 9.9.0"):
        open_backend(foreign, backend="tensorrt")
    lonely = tmp_path / "lonely.engine"
    shutil.copy(path, lonely)
    with pytest.raises(EngineError, match="no sidecar"):
        open_backend(lonely, backend="tensorrt")


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_onnx_builds_once_then_reuses_then_rebuilds(gpu, trt_onnx, tmp_path):
    onnx = tmp_path / "model.onnx"
    shutil.copy(trt_onnx["fixed"], onnx)
    messages = []
    with open_backend(onnx, backend="tensorrt", progress=False, log=messages.append) as be:
        assert not be.decision.reuse and be.decision.reasons == ["no cached engine yet"]
        engine_path = be.engine_path
    assert engine_path == tmp_path / "model.fp32.engine" and engine_path.is_file()
    with open_backend(onnx, backend="tensorrt", progress=False, log=messages.append) as be:
        assert be.decision.reuse
    shutil.copy(trt_onnx["dynamic"], onnx)  # a different ONNX under the same name
    with open_backend(onnx, backend="tensorrt", progress=False, log=messages.append, opt_shape="1x3x64x96") as be:
        assert not be.decision.reuse and any("the ONNX changed" in r for r in be.decision.reasons)
    assert any(m.startswith("building") for m in messages) and any(m.startswith("reusing") for m in messages)


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_camvid
def test_dynamic_engine_profile(gpu, small_onnx_dynamic, tmp_path):
    """Real CamVid val frames at three sizes of the profile, through a model whose masks vary
    (small_onnx_dynamic: BatchNorm statistics from image-like input, many classes per frame)."""
    import cv2

    from dilseg.runtime.dataset import SegmentationDataset
    from dilseg.runtime.preprocess import preprocess
    from dilseg.runtime.trt.build import BuildOptions, build_engine

    path = tmp_path / "dyn.engine"
    build_engine(small_onnx_dynamic, path, BuildOptions(min_shape="1x3x64x64", opt_shape="1x3x64x96",
                                                        max_shape="1x3x128x160", progress=False))
    data = SegmentationDataset(CAMVID, "val")
    images = [data[i][0] for i in (0, 40, 80)]  # BGR, as sources deliver frames
    with open_backend(path, backend="tensorrt") as be:
        masks = []
        for h, w in ((64, 64), (128, 160), (64, 96)):
            for image in images:
                x = preprocess(cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA), be.meta)
                assert x.shape == (1, 3, h, w)
                got, ref = be.infer(x), ort_labels(small_onnx_dynamic, x)
                assert got.shape == ref.shape == (1, h, w)
                assert len(np.unique(ref)) >= 3, f"{h}x{w}: the reference predicts {np.unique(ref)}"
                # fp32 engine; TF32 (TensorRT's default on Ampere+) may flip near-tie pixels only.
                assert (got == ref).mean() >= 0.99, f"{h}x{w}: agreement {(got == ref).mean():.4f}"
                masks.append(got)
        assert len({m.tobytes() for m in masks}) == len(masks)  # every frame and size its own mask
        with pytest.raises(BackendError, match="outside the engine's shape profile"):
            be.infer(np.zeros((1, 3, 256, 256), np.float32))


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_fp16_flag_by_version(gpu, trt_onnx, tmp_path):
    import tensorrt as trt

    from dilseg.runtime.trt.build import BuildError, BuildOptions, build_engine
    from dilseg.runtime.preprocess import preprocess
    from dilseg.runtime.trt.compat import describe

    opts = BuildOptions(fp16=True, progress=False)
    if not describe(trt.__version__).weak_typing:
        with pytest.raises(BuildError, match="strongly typed only"):
            build_engine(trt_onnx["fixed"], tmp_path / "h.engine", opts)
        return
    result = build_engine(trt_onnx["fixed"], tmp_path / "h.engine", opts)
    assert result.sidecar["precision"] == result.sidecar["meta"]["precision"] == "fp16"
    assert result.sidecar["options"]["onnx_precision"] == "fp32"
    with open_backend(tmp_path / "h.engine", backend="tensorrt") as be:
        x = preprocess(frames(1, 64, 96)[0], be.meta)
        assert (be.infer(x) == ort_labels(trt_onnx["fixed"], x)).mean() >= 0.95


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_cli_build_with_timing_cache(gpu, trt_onnx, tmp_path):
    r = subprocess.run([sys.executable, "-m", "dilseg.runtime.cli", "build", str(trt_onnx["fixed"]), "-o",
                        str(tmp_path / "m.engine"), "--timing-cache", str(tmp_path / "t.cache"), "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "built" in r.stdout and " s: fp32 engine for " in r.stdout
    assert (tmp_path / "t.cache").stat().st_size > 0 and (tmp_path / "m.engine.json").is_file()
    assert "timing-cache" not in r.stderr
    # The cache just written is accepted by the next build (set_timing_cache answered True) and rewritten.
    r = build_cli(trt_onnx["fixed"], tmp_path / "m2.engine", "--timing-cache", tmp_path / "t.cache")
    assert r.returncode == 0 and "timing-cache" not in r.stderr, r.stderr
    # A cache TensorRT refuses (here: not a timing cache at all) is reported and left as it was.
    junk = tmp_path / "junk.cache"
    junk.write_bytes(b"not a timing cache" * 64)
    r = build_cli(trt_onnx["fixed"], tmp_path / "m3.engine", "--timing-cache", junk)
    assert r.returncode == 0 and (tmp_path / "m3.engine").is_file(), r.stderr
    assert f"warning: --timing-cache {junk}: TensorRT" in r.stderr and "did not accept it" in r.stderr
    assert junk.read_bytes() == b"not a timing cache" * 64


def build_cli(onnx, engine, *extra):
    return subprocess.run([sys.executable, "-m", "dilseg.runtime.cli", "build", str(onnx), "-o", str(engine),
                           "--no-progress", *map(str, extra)], capture_output=True, text=True, timeout=600)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_the_runner_runs_what_its_loader_hands_it(engine, trt_onnx, tmp_path):
    from dilseg.runtime.preprocess import preprocess
    from dilseg.runtime.trt.loaders import EngineFromFile, EngineFromOnnx
    from dilseg.runtime.trt.runner import TensorRTBackend

    path, _ = engine
    onnx = tmp_path / "composed.onnx"
    shutil.copy(trt_onnx["fixed"], onnx)
    messages = []
    with TensorRTBackend(EngineFromFile(path)) as from_file, \
            TensorRTBackend(EngineFromOnnx(onnx, log=messages.append)) as from_onnx:
        assert from_file.decision is None and not from_onnx.decision.reuse
        assert from_onnx.engine_path == tmp_path / "composed.fp32.engine"
        x = preprocess(frames(1, 64, 96)[0], from_file.meta)
        np.testing.assert_array_equal(from_file.infer(x), from_onnx.infer(x))
    assert any(m.startswith("building") for m in messages)
