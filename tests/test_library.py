"""The README's library example, run as written on a real street frame with the shipped model,
so the documented API cannot drift from the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from precision_helpers import CAMVID

README = Path(__file__).resolve().parents[1] / "README.md"


def library_example() -> str:
    text = README.read_text()
    section = text.split("## Use it as a library", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the README's library section has no python block"
    return blocks[0]


def test_the_readme_example_is_short():
    code = [line for line in library_example().splitlines() if line.strip()]
    assert len(code) <= 10, f"the library example grew to {len(code)} lines"


def test_the_readme_example_runs_on_a_street_frame(tmp_path):
    images = sorted((CAMVID / "val" / "images").glob("*.png")) + sorted((CAMVID / "val" / "images").glob("*.jpg"))
    if not images:
        pytest.skip(f"CamVid not found at {CAMVID}")
    street = cv2.imread(str(images[0]), cv2.IMREAD_COLOR)
    cv2.imwrite(str(tmp_path / "street.jpg"), street)
    run = subprocess.run([sys.executable, "-c", library_example()], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr

    from dilseg.runtime import ViewSettings, open_segmenter

    frame = cv2.imread(str(tmp_path / "street.jpg"), cv2.IMREAD_COLOR)  # what the example read
    with open_segmenter() as seg:
        result = seg.process(frame)
        want = seg.render(result, ViewSettings(view="overlay", alpha=0.5))
    overlay = cv2.imread(str(tmp_path / "street_overlay.jpg"), cv2.IMREAD_COLOR)
    assert overlay.shape == frame.shape
    assert np.abs(overlay.astype(int) - want.astype(int)).mean() < 3  # JPEG-encoded by the example
    mask = cv2.imread(str(tmp_path / "masks" / "street.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(mask, result.labels)
    # A street: road and building are found and printed with their share of the picture.
    assert "'Road':" in run.stdout and "'Building':" in run.stdout
    assert "frames in 1, out 1" in run.stdout


def test_segmenter_face_on_a_small_model(small_onnx, tmp_path):
    from dilseg.runtime import DilsegError, ViewSettings, open_segmenter
    from dilseg.runtime.postprocess import render
    from dilseg.runtime.sources import test_frame

    frame = test_frame(5, 160, 120)
    with open_segmenter(small_onnx, threads=1) as seg:
        result = seg.process(frame)
        assert result.frame is frame and result.labels.shape == (120, 160)
        assert {"preprocess", "infer", "postprocess"} <= set(result.timings)
        np.testing.assert_array_equal(result.labels, seg(frame).labels)
        for view in (ViewSettings(), ViewSettings("mask", visible=(0, 3)), ViewSettings("side-by-side", 0.8, legend=True)):
            np.testing.assert_array_equal(seg.render(result, view),
                                          render(frame, result.labels, seg.meta, view.view, view.alpha,
                                                 view.visible_list, view.legend))
    with pytest.raises(DilsegError, match="no such model file"):
        open_segmenter(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="view must be one of"):
        ViewSettings("sepia")



def test_open_segmenter_takes_a_triton_url_as_the_cli_does():
    """A served model's URL reaches the Triton backend as it is (a Path folded triton:// into
    triton:/ and said 'no such model file'); with nothing listening it cannot reach the server."""
    pytest.importorskip("tritonclient.grpc")
    import socket

    from dilseg.runtime import DilsegError, open_segmenter

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DilsegError, match=rf"triton://127\.0\.0\.1:{port}/edge_m: cannot reach Triton"):
        open_segmenter(f"triton://127.0.0.1:{port}/edge_m", timeout=2)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_render_on_the_gpu_draws_the_cpu_picture(gpu, trt_onnx, tmp_path):
    """TensorRT with pycuda: seg.render colours and blends the frame the engine holds on the GPU;
    an older result (the engine holds another frame) is drawn on the CPU. Needs a GPU."""
    from dilseg.runtime import ViewSettings, open_segmenter
    from dilseg.runtime.sources import test_frame
    from dilseg.runtime.trt.build import BuildOptions, build_engine

    engine = tmp_path / "edge_s.engine"
    build_engine(trt_onnx["fixed"], engine, BuildOptions(progress=False))
    views = (ViewSettings(), ViewSettings("mask", visible=(0, 3, 4)), ViewSettings("side-by-side", 0.7, legend=True))
    with open_segmenter(engine) as seg:
        assert seg.backend.capabilities.gpu_render
        for i in range(3):
            frame = test_frame(7 * i, 480, 360)
            result = seg.process(frame)
            for view in views:
                cpu = view.render(frame, result.labels, seg.meta)
                assert np.abs(seg.render(result, view).astype(int) - cpu.astype(int)).max() <= 1, view
        older = result
        seg.process(test_frame(99, 480, 360))
        np.testing.assert_array_equal(seg.render(older, views[0]), views[0].render(older.frame, older.labels, seg.meta))
