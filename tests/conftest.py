"""Shared fixtures: small real ONNX models exported from `edge_s` with the project's exporter.

Session-scoped, so each is exported (and verified against PyTorch) once per test run:

- ``small_onnx``          edge_s, fixed 64x96 input, ``labels`` output (int32 class ids in the graph)
- ``small_onnx_logits``   the same weights, fixed 64x96, ``logits`` output (NxCxHxW)
- ``small_onnx_dynamic``  the same weights, dynamic batch/height/width, ``labels`` output

All three carry the CamVid metadata (11 classes, palette). Their weights are a seeded fresh
initialisation whose BatchNorm statistics were gathered on the synthetic test pattern, so the
masks they predict on real frames contain many classes (a constant mask would let mask
comparisons pass vacuously). torch is imported only when a fixture is first used, so test
files that do not use them stay torch-free.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest_plugins = ["conftest_servers"]  # real servers, tmpfs, nvcc: see servers.py

SMALL_SIZE = (64, 96)  # (H, W) of the fixed-size fixtures


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny PyTorch models (``pytest.mark.usefixtures("one_torch_thread")``): one
    thread runs them in milliseconds, while OpenMP workers waiting on busy cores can make each
    forward pass hundreds of times slower."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_model():
    """The edge_s torch module behind the small ONNX fixtures (eval mode)."""
    import torch

    from dilseg.runtime.classes import PRESETS
    from dilseg.export.zoo import create_model
    from dilseg.runtime.preprocess import preprocess
    from dilseg.runtime.sources import test_frame

    torch.manual_seed(0)
    model = create_model("edge_s").train()
    meta = PRESETS["camvid"].model_meta("edge_s", SMALL_SIZE)
    frames = [test_frame(i, 160, 120) for i in range(0, 200, 20)]
    x = torch.from_numpy(np.concatenate([preprocess(f, meta) for f in frames]))
    with torch.no_grad():
        for _ in range(3):  # train-mode passes: BatchNorm running statistics from image-like input
            model(x)
    return model.eval()


def _export(model, out: Path, size: tuple[int, int] | None, output_kind: str) -> Path:
    from dataclasses import replace

    from dilseg.export.onnx_export import export_onnx
    from dilseg.runtime.classes import PRESETS

    meta = replace(PRESETS["camvid"].model_meta("edge_s", size), output_kind=output_kind)
    export_onnx(model, meta, out, size)
    return out


@pytest.fixture(scope="session")
def small_onnx(small_model, tmp_path_factory) -> Path:
    """edge_s ONNX, 64x96 input, labels output."""
    return _export(small_model, tmp_path_factory.mktemp("onnx") / "edge_s_64x96.onnx", SMALL_SIZE, "labels")


@pytest.fixture(scope="session")
def small_onnx_logits(small_model, tmp_path_factory) -> Path:
    """edge_s ONNX, 64x96 input, logits output."""
    return _export(small_model, tmp_path_factory.mktemp("onnx") / "edge_s_64x96_logits.onnx", SMALL_SIZE, "logits")


@pytest.fixture(scope="session")
def small_onnx_dynamic(small_model, tmp_path_factory) -> Path:
    """edge_s ONNX with dynamic batch, height and width, labels output."""
    return _export(small_model, tmp_path_factory.mktemp("onnx") / "edge_s_dynamic.onnx", None, "labels")


@pytest.fixture(scope="session")
def batch_onnx(small_onnx, tmp_path_factory) -> Path:
    """small_onnx (64x96, batch fixed at 1) with its batch axis freed by `dilseg export onnx --batch dynamic`."""
    from dilseg.runtime.cli import main

    out = tmp_path_factory.mktemp("batch") / "edge_s_batch.onnx"
    assert main(["export", "onnx", "--from", str(small_onnx), "--batch", "dynamic", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def write_video():
    """``write_video(path, frames, fps=10.0, fourcc="mp4v") -> path``: a real video file written with
    cv2.VideoWriter (frames: BGR uint8 arrays of one size)."""
    import cv2

    def write(path: Path, frames: list[np.ndarray], fps: float = 10.0, fourcc: str = "mp4v") -> Path:
        h, w = frames[0].shape[:2]
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
        assert writer.isOpened(), f"OpenCV cannot write {fourcc} to {path}"
        for frame in frames:
            writer.write(frame)
        writer.release()
        return Path(path)

    return write


def read_video(path: Path) -> list[np.ndarray]:
    """Every frame OpenCV decodes from a video file."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


@pytest.fixture(scope="session")
def video_frames():
    """``video_frames(path) -> list of BGR frames``: decode a video with OpenCV."""
    return read_video


# -- TensorRT tests: one small export shared by every file ------------------------------

class _SmallOnnx:
    """edge_s exported at 64x96 ("fixed") or with dynamic H/W ("dynamic"), each on first use and
    kept in the session's base temp folder, so every TensorRT test file shares one export."""

    def __init__(self, base):
        self.base = base

    def __getitem__(self, kind):
        path = self.base / f"trt_edge_s_{'64x96' if kind == 'fixed' else 'dynamic'}.onnx"
        if not path.exists():
            import torch

            from dilseg.export.onnx_export import export_onnx
            from dilseg.runtime.classes import PRESETS
            from dilseg.export.zoo import create_model

            torch.manual_seed(0)
            export_onnx(create_model("edge_s"), PRESETS["camvid"].model_meta("edge_s"), path, (64, 96) if kind == "fixed" else None)
        return path


@pytest.fixture(scope="session")
def trt_onnx(tmp_path_factory):
    return _SmallOnnx(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def pycuda_device():
    """pycuda's driver module, initialised, once pycuda and a CUDA device are there (no context
    made); else the test is skipped with the reason (GPU tests: marked gpu)."""
    cuda = pytest.importorskip("pycuda.driver", reason="pycuda is not installed (GPU test)")
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            pytest.skip("no CUDA device")
    except Exception as exc:
        pytest.skip(f"no usable CUDA driver: {exc}")
    return cuda


@pytest.fixture(scope="session")
def gpu(request):
    """pycuda's driver module once TensorRT, pycuda and a CUDA device are all there; else the test
    is skipped with the reason (GPU tests: marked gpu/tensorrt)."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (GPU test)")
    return request.getfixturevalue("pycuda_device")
