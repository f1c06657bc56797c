"""The backend factory, typed options, capabilities and the lifecycle the base writes once, on
real artifacts: exported ONNX files on ONNX Runtime, the shipped weights on PyTorch, and the
TensorRT backend up to where it needs TensorRT (the rest is in test_trt_engine.py, GPU-marked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from dilseg.runtime.backends import (Backend, BackendError, Capabilities, backend_class, backend_names, choose,
                                     open_backend)
from dilseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend, OnnxRuntimeOptions
from dilseg.runtime.cli import main
from dilseg.runtime.errors import DilsegError
from dilseg.runtime.preprocess import preprocess
from dilseg.runtime.segmenter import Segmenter
from dilseg.runtime.sources import test_frame

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "models" / "edge_m_camvid.safetensors"
HAVE_TRT = subprocess.run([sys.executable, "-c", "import tensorrt"], capture_output=True).returncode == 0


def test_auto_picks_by_suffix(tmp_path: Path, small_onnx) -> None:
    assert choose(small_onnx).name == "onnxruntime"
    for name in ("m.engine", "m.plan", "m.ENGINE"):
        assert choose(tmp_path / name).name == "tensorrt"
    assert choose(WEIGHTS).name == "pytorch"
    with pytest.raises(BackendError, match=r"m\.pt: not a model dilseg runs"):
        choose(tmp_path / "m.pt")
    assert backend_names()[:3] == ("auto", "onnxruntime", "tensorrt") and "pytorch" in backend_names()


def test_an_artifact_on_the_wrong_backend_says_which_one_runs_it(tmp_path: Path, small_onnx) -> None:
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"serialized engine bytes")
    with pytest.raises(BackendError, match=r"ONNX Runtime backend runs \.onnx models, not a \.engine file; "
                                           r"run it with --backend tensorrt"):
        open_backend(engine, "onnxruntime")
    with pytest.raises(BackendError, match=r"PyTorch backend runs \.safetensors .*, not a \.onnx file; "
                                           r"run it with --backend onnxruntime"):
        open_backend(small_onnx, "pytorch")
    with pytest.raises(BackendError, match="unknown backend 'openvinox'"):
        open_backend(small_onnx, "openvinox")
    with pytest.raises(BackendError, match="nope.onnx: no such model file"):
        open_backend(tmp_path / "nope.onnx")


def test_options_a_backend_lacks_are_the_same_error_everywhere(tmp_path: Path, small_onnx) -> None:
    # TensorRT's option on ONNX Runtime, ONNX Runtime's on TensorRT and on PyTorch: one message
    # shape, naming the backend the option belongs to; refused before anything is loaded.
    with pytest.raises(BackendError, match=r"^--cuda-graph: TensorRT option\(s\), but edge_s_64x96.onnx runs on "
                                           r"ONNX Runtime here; add --backend tensorrt"):
        open_backend(small_onnx, cuda_graph=True)
    with pytest.raises(BackendError, match=r"^--threads: ONNX Runtime option\(s\), but edge_s_64x96.onnx runs on "
                                           r"TensorRT here; add --backend onnxruntime"):
        open_backend(small_onnx, "tensorrt", threads=2)
    with pytest.raises(BackendError, match=r"^--threads: ONNX Runtime option\(s\), but edge_m_camvid.safetensors "
                                           r"runs on PyTorch here"):
        open_backend(WEIGHTS, threads=2)
    with pytest.raises(BackendError, match=r"^--warp-speed: not option\(s\) of the ONNX Runtime backend "
                                           r"\(it takes: --threads, --providers\)"):
        open_backend(small_onnx, warp_speed=9)
    with pytest.raises(BackendError, match=r"--threads -3: must be a whole number >= 1"):
        open_backend(small_onnx, threads=-3)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"serialized engine bytes")
    with pytest.raises(BackendError, match=r"^--fp16, --dla-core: build option\(s\), but m.engine is built already"):
        open_backend(engine, fp16=True, dla_core=0)
    with pytest.raises(BackendError, match="the TensorRT backend takes TensorRTOptions, not OnnxRuntimeOptions"):
        open_backend(engine, options=OnnxRuntimeOptions(threads=1))
    # Constructed directly (no factory), an option the class lacks is the same one-line error.
    with pytest.raises(BackendError, match=r"^--cuda-graph: not option\(s\) of the ONNX Runtime backend"):
        OnnxRuntimeBackend(small_onnx, cuda_graph=True)


def test_typed_options_and_keywords_give_the_same_backend(small_onnx) -> None:
    typed = open_backend(small_onnx, options=OnnxRuntimeOptions(threads=1, providers=("cpu",)))
    keywords = open_backend(small_onnx, threads=1, providers=["cpu"])
    assert typed.options == keywords.options and typed.threads == 1
    assert typed.providers == ["CPUExecutionProvider"]
    x = preprocess(test_frame(3, 96, 64), typed.meta)
    np.testing.assert_array_equal(typed.infer(x), keywords.infer(x))


def test_onnxruntime_opens_one_session(small_onnx, monkeypatch) -> None:
    opened = []

    class Counting(ort.InferenceSession):
        def __init__(self, path, *args, **kwargs):
            opened.append(path)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", Counting)
    backend = open_backend(small_onnx)
    assert opened == [str(small_onnx)]  # metadata and inference from the same session
    assert backend.meta.model == "edge_s" and backend.meta.input_size == (64, 96)


def test_the_lifecycle_is_written_once(small_onnx) -> None:
    backend = OnnxRuntimeBackend(small_onnx)
    assert not backend.is_loaded and backend.meta is None
    x = preprocess(test_frame(0, 96, 64), open_backend(small_onnx).meta)
    with pytest.raises(BackendError, match="ONNX Runtime backend is not loaded"):
        backend.infer(x)
    with backend as loaded:
        assert loaded is backend and backend.is_loaded
        assert loaded.infer(x).shape == (1, 64, 96)
    assert not backend.is_loaded
    backend.close()  # twice is fine
    with pytest.raises(BackendError, match="not loaded"):
        backend.infer(x)
    assert backend.load() is backend and backend.load().is_loaded  # load again after close


def test_capabilities_are_declared_not_probed() -> None:
    assert OnnxRuntimeBackend.capabilities == Capabilities()
    caps = backend_class("tensorrt").capabilities
    assert caps.frame_input and caps.gpu_render and caps.stage_timings
    assert backend_class("pytorch").capabilities == Capabilities()
    assert all(issubclass(backend_class(n), Backend) for n in ("onnxruntime", "tensorrt", "pytorch"))


def test_every_backend_says_whether_it_runs_here_and_why_not(tmp_path: Path, monkeypatch) -> None:
    from dilseg.runtime.backends import unavailable_reason
    from dilseg.runtime.backends.base import has_nvidia_gpu

    assert Backend.available() is None and OnnxRuntimeBackend.available() is None  # the default: runs
    assert unavailable_reason("onnxruntime") is None
    assert unavailable_reason("openvino") is None  # the openvino extra is installed for the tests
    trt_reason = unavailable_reason("tensorrt")
    if not HAVE_TRT:
        assert trt_reason.startswith("tensorrt is not installed") and "dilseg[trt]" in trt_reason
    elif not has_nvidia_gpu():
        assert "no NVIDIA GPU" in trt_reason
    assert "unknown backend 'nope'" in unavailable_reason("nope")

    class Needs(OnnxRuntimeBackend):
        requires = (("dilseg_no_such_module", "pip install dilseg-no-such-module"),)

    assert Needs.available() == "dilseg_no_such_module is not installed (pip install dilseg-no-such-module)"
    # Installed but broken (a library it loads is missing) is as unusable, and says what broke.
    (tmp_path / "dilseg_broken_module.py").write_text("raise OSError('libnvinfer.so.10: cannot open shared object')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    Needs.requires = (("dilseg_broken_module", "reinstall it"),)
    assert Needs.available() == ("dilseg_broken_module is installed but does not import "
                                 "(OSError: libnvinfer.so.10: cannot open shared object)")

    class NeedsGpu(OnnxRuntimeBackend):
        needs_nvidia_gpu = True

    assert (NeedsGpu.available() is None) == has_nvidia_gpu()


def test_a_backend_without_frame_input_or_gpu_render_says_so(small_onnx) -> None:
    backend = open_backend(small_onnx)
    with pytest.raises(BackendError, match="takes preprocessed tensors only"):
        backend.infer_frame(test_frame(0, 96, 64))
    with pytest.raises(BackendError, match="has no GPU renderer"):
        backend.render_last()


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here; the missing-TensorRT path cannot be exercised")
def test_tensorrt_options_are_typed_before_tensorrt_is_needed(small_onnx) -> None:
    with pytest.raises(BackendError, match="--dla-core -1: must be 0 or more"):
        open_backend(small_onnx, "tensorrt", dla_core=-1)
    with pytest.raises(BackendError, match="TensorRT is not installed for this Python"):
        open_backend(small_onnx, "tensorrt", cuda_graph=True, opt_shape="1x3x64x96")


def test_weights_run_on_pytorch_through_the_same_factory(tmp_path: Path, capsys) -> None:
    # `dilseg run` and `dilseg bench` take the same artifacts as eval and verify.
    rc = main(["run", "--model", str(WEIGHTS), "--source", "test://96x64?frames=3", "--labels",
               str(tmp_path / "masks"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    masks = sorted((tmp_path / "masks").glob("*.png"))
    assert len(masks) == 3
    with open_backend(WEIGHTS, input_size=(64, 96)) as torch_backend, open_backend(
            REPO / "models" / "edge_m_camvid.onnx") as onnx_backend:
        assert torch_backend.name == "pytorch" and torch_backend.meta.classes == onnx_backend.meta.classes
        frame = test_frame(0, 96, 64)
        labels = Segmenter(torch_backend)(frame).labels
        assert labels.shape == (64, 96) and len(np.unique(labels)) >= 2
        assert np.array_equal(cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED),
                              Segmenter(open_backend(WEIGHTS))(frame).labels)


def test_every_user_facing_error_shares_one_root() -> None:
    from dilseg.runtime import artifact, dataset, evaluate, files, metadata, sinks, sources
    from dilseg.runtime.trt import build, cache, compat

    classes = [BackendError, cache.EngineError, build.BuildError, compat.TrtCompatError, metadata.MetadataError,
               dataset.DatasetError, sources.SourceError, sinks.SinkError, evaluate.VerifyError, files.OutputError]
    assert all(issubclass(c, DilsegError) for c in classes)
    assert issubclass(files.OutputError, OSError)  # code that handles failed writes still does
    assert artifact.ENGINE_SUFFIXES == (".engine", ".plan")
    # Export and demo classes too (imported there, as the runtime never does).
    code = ("from dilseg.runtime.errors import DilsegError\n"
            "from dilseg.export import onnx_export, quantize, train, weights, zoo\n"
            "from dilseg.demo import loading, media\n"
            "from dilseg.runtime.cli import CliError\n"
            "cs = [onnx_export.ExportError, quantize.QuantizeError, train.TrainError, weights.WeightsError,\n"
            "      zoo.UnknownModelError, loading.ModelChoiceError, media.MediaError, CliError]\n"
            "print('ALL', all(issubclass(c, DilsegError) for c in cs))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ALL True" in r.stdout, r.stderr


def test_failed_writes_are_one_line_errors_that_name_the_file(tmp_path: Path, small_onnx, capsys) -> None:
    # --json under a file (not a folder): refused before the benchmark runs, naming the path.
    (tmp_path / "plain").write_text("x")
    rc = main(["bench", "--model", str(small_onnx), "--frames", "2", "--warmup", "0", "--quiet",
               "--json", str(tmp_path / "plain" / "b.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "plain/b.json" in err and "does not exist" in err and "Traceback" not in err
    from dilseg.runtime.files import OutputError, atomic_write_bytes

    with pytest.raises(OutputError, match=r"b\.json: folder .*plain does not exist"):
        atomic_write_bytes(tmp_path / "plain" / "b.json", b"{}")


def test_a_folder_of_tif_images_runs_and_verifies(tmp_path: Path, small_onnx, capsys) -> None:
    # One image-suffix list: `run` and `verify` (and datasets) take the same folders.
    folder = tmp_path / "tifs"
    folder.mkdir()
    for i in range(2):
        assert cv2.imwrite(str(folder / f"f{i}.tif"), test_frame(i * 7, 96, 64))
    assert main(["run", "--model", str(small_onnx), "--source", str(folder), "--labels", str(tmp_path / "m"),
                 "--quiet"]) == 0
    assert len(list((tmp_path / "m").glob("*.png"))) == 2
    assert main(["verify", str(small_onnx), str(small_onnx), "--data", str(folder), "--no-progress",
                 "--min-agreement", "100"]) == 0
    assert "2 images" in capsys.readouterr().out
