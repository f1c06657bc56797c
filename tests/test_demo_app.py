"""The demo page through Streamlit's AppTest: controls, uploads and the shared server camera,
checked against what the Segmenter itself produces on the same input.

The model is a freshly initialised edge_s exported at 64x96 with a fixed seed: its masks
are arbitrary but deterministic, and every expected value is computed here with the runtime,
never written down.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("streamlit")
pytest.importorskip("streamlit_webrtc")

import streamlit.testing.v1.app_test as app_test_module  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from dilseg.demo import shared_camera  # noqa: E402
from dilseg.demo.settings import ENV_MODEL  # noqa: E402
from dilseg.runtime.backends import open_backend  # noqa: E402
from dilseg.runtime.postprocess import colorize, palette_bgr, render  # noqa: E402
from dilseg.runtime.segmenter import Segmenter  # noqa: E402

APP = str(Path(__file__).resolve().parents[1] / "demo" / "app.py")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """edge_s, random weights (seeded), 64x96, exported and verified like any dilseg ONNX."""
    torch = pytest.importorskip("torch")
    from dilseg.export.onnx_export import export_onnx
    from dilseg.runtime.classes import PRESETS
    from dilseg.export.zoo import create_model

    path = tmp_path_factory.getbasetemp() / "demo_edge_s_64x96.onnx"
    if not path.exists():
        torch.manual_seed(0)
        export_onnx(create_model("edge_s"), PRESETS["camvid"].model_meta("edge_s"), path, (64, 96))
    return path


@pytest.fixture(scope="module")
def segmenter(model) -> Segmenter:
    return Segmenter(open_backend(model))


@pytest.fixture
def downloads(monkeypatch):
    """Read what a download button serves: keep a handle on AppTest's in-memory media store
    (the real one, only remembered) and look files up by the button's URL."""
    stores = []

    class Remembered(app_test_module.MemoryMediaFileStorage):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            stores.append(self)

    monkeypatch.setattr(app_test_module, "MemoryMediaFileStorage", Remembered)

    def fetch(button) -> bytes:
        name = button.proto.url.rsplit("/", 1)[-1]
        for store in reversed(stores):
            try:
                return store.get_file(name).content
            except Exception:
                continue
        raise AssertionError(f"no media file behind {button.label!r} ({button.proto.url})")

    return fetch


def app(monkeypatch, model: Path | None, source: str = "image") -> AppTest:
    if model is None:
        monkeypatch.delenv(ENV_MODEL, raising=False)
    else:
        monkeypatch.setenv(ENV_MODEL, str(model))
    at = AppTest.from_file(APP, default_timeout=60)
    # The browser webcam needs a live Streamlit server (the end-to-end test covers it).
    at.session_state["source"] = source
    return at.run()


def messages(at: AppTest, kind: str = "error") -> str:
    return "\n".join(e.value for e in getattr(at, kind)) + "\n".join(e.value for e in getattr(at.sidebar, kind))


def picture_of_blocks(h: int = 120, w: int = 160) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (40, 40, 220)
    img[: h // 2, w // 2:] = (200, 80, 20)
    img[h // 2:, : w // 2] = (40, 160, 60)
    img[h // 2:, w // 2:] = (0, 220, 255)
    img[h // 3: h // 3 + 10] = (250, 250, 250)
    return img


def png_bytes(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def decode(data: bytes, flags=cv2.IMREAD_UNCHANGED) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    assert image is not None, "the download is not a decodable PNG"
    return image


def buttons(at: AppTest) -> dict:
    return {b.label: b for b in at.get("download_button")}


# ---------------------------------------------------------------------------------- controls


def test_sidebar_offers_models_backends_views_and_sources(monkeypatch, model):
    at = app(monkeypatch, model)
    assert not at.exception
    radios = {r.label: r for r in at.sidebar.radio}
    assert radios["Model"].options == ["Default model", "Model file path", "Upload .onnx", "Triton server"]
    assert radios["View"].options == ["overlay", "mask", "side-by-side"]
    assert radios["Source"].options == ["Browser webcam", "Server camera or stream", "Upload image", "Upload video"]
    # Every backend is listed; those this machine cannot run sit in a disabled group with the reason.
    import onnxruntime as ort

    offered = radios["Backend"].options
    assert offered[0] == "Auto (fastest here)" and "ONNX Runtime CPU" in offered
    unavailable = radios.get("Unavailable here")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert ("ONNX Runtime CUDA" in offered) == has_cuda
    if unavailable is not None:
        assert unavailable.proto.disabled
        assert set(unavailable.options) | set(offered) == {"Auto (fastest here)", "TensorRT", "OpenVINO",
                                                           "ONNX Runtime CPU", "ONNX Runtime CUDA"}
        reasons = list(unavailable.proto.captions)
        assert len(reasons) == len(unavailable.options) and all(len(r) > 20 for r in reasons)
        if not has_cuda:
            assert "onnxruntime-gpu" in reasons[unavailable.options.index("ONNX Runtime CUDA")]
    # The loaded model is described, and its classes are the "classes to show".
    assert any("edge_s" in c.value and "64x96" in c.value for c in at.sidebar.caption)
    classes = at.sidebar.multiselect[0]
    assert len(classes.value) == 11 and classes.format_func(0) == "Sky"
    assert at.sidebar.slider(key="alpha").value == 0.5


def test_missing_shipped_model_gives_a_message_and_a_way_out(monkeypatch, tmp_path, model):
    monkeypatch.setattr("dilseg.demo.loading.default_model_path", lambda: tmp_path / "edge_m_camvid.onnx")
    at = app(monkeypatch, None)
    assert not at.exception
    text = messages(at, "info") + messages(at, "warning")
    assert "edge_m_camvid.onnx" in text and "--model" in text
    # Pointing the sidebar at a model file makes the page usable without restarting.
    at.sidebar.radio(key="model_kind").set_value("path").run()
    at.sidebar.text_input(key="model_path").input(str(model)).run()
    assert not messages(at)
    assert any(b.label == "Image" for b in at.file_uploader)


def test_the_page_starts_on_the_shipped_model_and_segments_a_street(monkeypatch, downloads):
    from precision_helpers import CAMVID

    if not (CAMVID / "val" / "images").is_dir():
        pytest.skip(f"CamVid not found at {CAMVID}")
    from dilseg.demo.loading import load_segmenter
    from dilseg.runtime.defaults import default_model_path

    at = app(monkeypatch, None)
    assert not at.exception and not messages(at)
    assert any("edge_m" in c.value for c in at.sidebar.caption)
    street = sorted((CAMVID / "val" / "images").glob("*.jpg"))[0]
    data = street.read_bytes()
    at.file_uploader(key="image_upload").upload(street.name, data, "image/jpeg").run()
    assert not at.exception and not messages(at)
    labels = decode(downloads(buttons(at)["Label PNG (class ids)"]))
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    # The page's starting choice (Auto: the fastest correct file and backend here), run directly.
    with load_segmenter(default_model_path(), "auto") as seg:
        np.testing.assert_array_equal(labels, seg.process(image).labels)
    # A street scene: building and road are both found.
    assert {1, 3}.issubset(set(np.unique(labels).tolist()))


# ---------------------------------------------------------------------------------- image


def test_uploaded_image_downloads_match_the_segmenter(monkeypatch, model, segmenter, downloads):
    at = app(monkeypatch, model)
    image = picture_of_blocks()
    at.file_uploader(key="image_upload").upload("blocks.png", png_bytes(image), "image/png").run()
    assert not at.exception and not messages(at)
    expected = segmenter(image).labels
    assert len(np.unique(expected)) > 1, "test precondition: the model should give more than one class here"

    got = buttons(at)
    labels = decode(downloads(got["Label PNG (class ids)"]))
    assert labels.dtype == np.uint8 and labels.ndim == 2
    np.testing.assert_array_equal(labels, expected)
    mask = decode(downloads(got["Colour mask (PNG)"]), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(mask, colorize(expected, palette_bgr(segmenter.meta)))
    shown = decode(downloads(got["Picture (PNG)"]), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(shown, render(image, expected, segmenter.meta, "overlay", 0.5))
    # The legend reports the class areas of this very mask.
    top = int(np.bincount(expected.ravel()).argmax())
    share = 100.0 * (expected == top).mean()
    legend = "\n".join(m.value for m in at.markdown)
    assert f"{segmenter.meta.classes[top]} <code>{share:5.1f}%</code>" in legend


def test_view_alpha_and_class_controls_change_the_result(monkeypatch, model, segmenter, downloads):
    at = app(monkeypatch, model)
    image = picture_of_blocks()
    at.file_uploader(key="image_upload").upload("blocks.png", png_bytes(image), "image/png").run()
    labels = segmenter(image).labels
    present = sorted(int(c) for c in np.unique(labels))
    hidden = present[0]
    keep = [c for c in range(11) if c != hidden]

    at.sidebar.radio(key="view").set_value("side-by-side")
    at.sidebar.slider(key="alpha").set_value(0.8)
    at.sidebar.multiselect[0].set_value(keep)
    at.run()
    assert not at.exception and not messages(at)
    got = buttons(at)
    shown = decode(downloads(got["Picture (PNG)"]), cv2.IMREAD_COLOR)
    assert shown.shape == (image.shape[0], image.shape[1] * 2, 3)
    np.testing.assert_array_equal(shown, render(image, labels, segmenter.meta, "side-by-side", 0.8, keep))
    # Hidden class: black in the colour mask, untouched picture pixels in the overlay half.
    mask = decode(downloads(got["Colour mask (PNG)"]), cv2.IMREAD_COLOR)
    assert (mask[labels == hidden] == 0).all() and (mask[labels != hidden] != 0).any(axis=-1).all()
    right = shown[:, image.shape[1]:]
    np.testing.assert_array_equal(right[labels == hidden], image[labels == hidden])
    # The label PNG stays the model's output whatever is shown.
    np.testing.assert_array_equal(decode(downloads(got["Label PNG (class ids)"])), labels)

    at.sidebar.radio(key="view").set_value("mask").run()
    shown = decode(downloads(buttons(at)["Picture (PNG)"]), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(shown, colorize(labels, palette_bgr(segmenter.meta, keep)))


def test_non_image_upload_is_reported_and_the_page_recovers(monkeypatch, model, segmenter, downloads):
    at = app(monkeypatch, model)
    at.file_uploader(key="image_upload").upload("notes.png", b"these are meeting notes, not pixels", "image/png")
    at.run()
    assert not at.exception
    assert "`notes.png` is not an image" in messages(at)
    assert not at.get("download_button")
    image = picture_of_blocks(90, 120)
    at.file_uploader(key="image_upload").set_value(("ok.jpg", cv2.imencode(".jpg", image)[1].tobytes(), "image/jpeg"))
    at.run()
    assert not messages(at)
    decoded = cv2.imdecode(cv2.imencode(".jpg", image)[1], cv2.IMREAD_COLOR)
    labels = decode(downloads(buttons(at)["Label PNG (class ids)"]))
    np.testing.assert_array_equal(labels, segmenter(decoded).labels)


def test_a_model_that_fails_mid_inference_is_reported_and_the_page_recovers(monkeypatch, tmp_path, model, segmenter,
                                                                             downloads):
    # Valid dilseg metadata, a graph ONNX Runtime loads, and a Reshape that can only fail at
    # run time (the spatial size is symbolic): the upload path must say so on the page.
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from dilseg.export.onnx_export import attach_metadata
    from dilseg.runtime.artifact import read_meta

    shape = helper.make_tensor("shape", TensorProto.INT64, [4], [7, 3, 1, -1])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["odd"]),
         helper.make_node("ArgMax", ["odd"], ["idx"], axis=1, keepdims=0),
         helper.make_node("Cast", ["idx"], ["labels"], to=TensorProto.INT32)],
        "fails-at-run-time", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("labels", TensorProto.INT32, [1, "h", "w"])], initializer=[shape])
    broken = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    attach_metadata(broken, read_meta(model))
    path = tmp_path / "broken.onnx"
    path.write_bytes(broken.SerializeToString())

    at = app(monkeypatch, path)
    image = picture_of_blocks(90, 120)
    at.file_uploader(key="image_upload").upload("street.png", cv2.imencode(".png", image)[1].tobytes(), "image/png")
    at.run()
    assert not at.exception
    text = messages(at)
    assert "Segmenting street.png failed" in text and "Try another model or backend" in text
    assert not at.get("download_button")
    # Back to a working model on the same page: the picture is segmented.
    at.sidebar.radio(key="model_kind").set_value("path").run()
    at.sidebar.text_input(key="model_path").input(str(model)).run()
    at.file_uploader(key="image_upload").set_value(("street.png", cv2.imencode(".png", image)[1].tobytes(),
                                                    "image/png")).run()
    assert not at.exception and not messages(at)
    labels = decode(downloads(buttons(at)["Label PNG (class ids)"]))
    np.testing.assert_array_equal(labels, segmenter(image).labels)


# ---------------------------------------------------------------------------------- video


def write_clip(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def read_all(data: bytes, tmp_path: Path, video_frames) -> list[np.ndarray]:
    path = tmp_path / "download.mp4"
    path.write_bytes(data)
    return video_frames(path)


def test_uploaded_video_is_segmented_frame_by_frame(monkeypatch, tmp_path, model, segmenter, downloads, video_frames):
    base = picture_of_blocks(96, 128)
    frames = [np.roll(base, 8 * i, axis=1) for i in range(6)]
    clip = write_clip(tmp_path / "clip.avi", frames)
    at = app(monkeypatch, model, source="video")
    at.file_uploader(key="video_upload").upload("clip.avi", clip.read_bytes(), "video/x-msvideo").run()
    assert not at.exception and not messages(at)
    assert at.get("progress") and "Done: 6 frames" in at.get("progress")[-1].proto.text
    out = read_all(downloads(buttons(at)["Download the segmented video (MP4)"]), tmp_path, video_frames)
    assert len(out) == len(frames)
    # What came in: the decoded AVI frames; what should come out: their overlays (H.264 is lossy).
    cap = cv2.VideoCapture(str(clip))
    for got in out:
        ok, src = cap.read()
        assert ok
        want = render(src, segmenter(src).labels, segmenter.meta, "overlay", 0.5)
        err = np.abs(got.astype(int) - want.astype(int)).mean()
        raw = np.abs(got.astype(int) - src.astype(int)).mean()
        assert err < 6 and err < raw / 3, f"output frame differs from the expected overlay ({err:.1f} vs raw {raw:.1f})"
    cap.release()


def corrupt_frames(path: Path, frames: tuple[int, ...], out: Path) -> Path:
    """A copy of an MJPEG AVI whose given frames cannot be decoded: the first 600 bytes of each
    of their JPEGs (markers and tables) overwritten with noise."""
    data = bytearray(path.read_bytes())
    starts = [i for i in range(len(data) - 3) if data[i:i + 3] == b"\xff\xd8\xff"]
    rng = np.random.default_rng(0)
    for k in frames:
        data[starts[k]:starts[k] + 600] = rng.integers(0, 256, 600, dtype=np.uint8).tobytes()
    out.write_bytes(bytes(data))
    return out


def test_video_with_corrupt_frames_keeps_every_good_frame_and_says_what_it_skipped(monkeypatch, tmp_path, model,
                                                                                   segmenter, downloads, video_frames):
    from dilseg.runtime.sources import test_frame

    frames = [test_frame(i * 3, 128, 96) for i in range(30)]
    clip = corrupt_frames(write_clip(tmp_path / "clip.avi", frames), (4, 5, 11, 20, 21, 22), tmp_path / "bad.avi")
    cap = cv2.VideoCapture(str(clip))
    good = []
    for _ in range(30):  # what a decoder makes of it: every frame that decodes, in order
        ok, frame = cap.read()
        if ok:
            good.append(frame)
    cap.release()
    assert len(good) == 24, "test precondition: six frames must fail to decode"
    at = app(monkeypatch, model, source="video")
    at.file_uploader(key="video_upload").upload("bad.avi", clip.read_bytes(), "video/x-msvideo").run()
    assert not at.exception and not messages(at)
    assert "Done: 24 frames" in at.get("progress")[-1].proto.text
    assert "6 corrupt frame(s) skipped" in at.get("progress")[-1].proto.text
    assert "bad.avi: 6 frame(s) could not be decoded" in messages(at, "warning")
    out = read_all(downloads(buttons(at)["Download the segmented video (MP4)"]), tmp_path, video_frames)
    assert len(out) == 24
    for got, src in zip(out, good):  # every good frame, in order (H.264 is lossy)
        want = render(src, segmenter(src).labels, segmenter.meta, "overlay", 0.5)
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 6


def test_corrupt_video_is_reported_and_the_page_recovers(monkeypatch, tmp_path, model):
    at = app(monkeypatch, model, source="video")
    at.file_uploader(key="video_upload").upload("broken.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 4000,
                                                 "video/mp4").run()
    assert not at.exception
    assert "`broken.mp4` cannot be decoded as a video" in messages(at)
    clip = write_clip(tmp_path / "ok.avi", [picture_of_blocks(64, 96)] * 3)
    at.file_uploader(key="video_upload").set_value(("ok.avi", clip.read_bytes(), "video/x-msvideo")).run()
    assert not messages(at)
    assert "Download the segmented video (MP4)" in buttons(at)


# ---------------------------------------------------------------------------------- models


def test_onnx_that_is_not_a_dilseg_model_is_rejected_readably(monkeypatch, tmp_path, model):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "not-seg",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    plain = onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    at = app(monkeypatch, model)
    at.sidebar.radio(key="model_kind").set_value("upload").run()
    at.sidebar.file_uploader(key="model_upload").upload("relu.onnx", plain.SerializeToString()).run()
    assert not at.exception
    text = messages(at)
    assert "not a dilseg segmentation model" in text and "no dilseg metadata" in text
    at.sidebar.file_uploader(key="model_upload").set_value(("junk.onnx", b"not protobuf at all" * 10,
                                                            "application/octet-stream")).run()
    assert "not a loadable ONNX model" in messages(at)
    # An uploaded real model works, and so does going back to the default.
    at.sidebar.file_uploader(key="model_upload").set_value(("edge_s.onnx", model.read_bytes(),
                                                            "application/octet-stream")).run()
    assert not messages(at) and any("edge_s" in c.value for c in at.sidebar.caption)
    at.sidebar.radio(key="model_kind").set_value("path").run()
    at.sidebar.text_input(key="model_path").input(str(tmp_path / "nope.onnx")).run()
    assert "no such file" in messages(at)


# ---------------------------------------------------------------------------------- server camera


@pytest.fixture
def cameras():
    yield
    shared_camera.stop_all()


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def start_server_source(at: AppTest, spec: str) -> AppTest:
    at.text_input(key="server_spec").input(spec)
    return at.button(key="server_start").click().run()


def test_missing_camera_is_reported_and_the_page_recovers(monkeypatch, model, cameras):
    at = app(monkeypatch, model, source="server")
    start_server_source(at, "7")
    assert not at.exception
    assert "Cannot open `7`" in messages(at) and "no camera at index 7" in messages(at)
    start_server_source(at, "/no/such/clip.mp4")
    assert "no such file" in messages(at)
    start_server_source(at, "test://64x48?fps=20")
    assert not messages(at) and shared_camera.running("test://64x48?fps=20") is not None


def test_two_tabs_share_one_worker_and_one_open(monkeypatch, model, segmenter, cameras):
    spec = "test://160x120?fps=25"
    opened_before = shared_camera.stats()["opened"].get(spec, 0)
    first = start_server_source(app(monkeypatch, model, source="server"), spec)
    second = start_server_source(app(monkeypatch, model, source="server"), spec)
    worker = shared_camera.running(spec)
    assert worker is not None and worker.alive
    assert shared_camera.stats()["opened"][spec] == opened_before + 1, "the second tab opened the source again"
    for at in (first, second):
        assert not at.exception and not messages(at)
        imgs = [h.proto.body for h in at.get("html") if "dilseg-stream" in h.proto.body]
        assert imgs and f"dilseg/stream/{worker.id}.mjpg?view=overlay" in imgs[0]
    # The shared worker segments with the page's model: its newest result is the Segmenter's
    # output on that very frame.
    wait_for(lambda: worker.meter.snapshot()["frames"] >= 5, what="the worker to process frames")
    result = worker.latest()
    np.testing.assert_array_equal(result.labels, segmenter(result.frame).labels)
    from dilseg.runtime.sources import test_frame

    np.testing.assert_array_equal(result.frame, test_frame(result.index, 160, 120))


def test_a_stopped_source_can_be_started_again(monkeypatch, model, cameras):
    spec = "test://64x48?fps=20"
    at = start_server_source(app(monkeypatch, model, source="server"), spec)
    first = shared_camera.running(spec)
    assert first is not None
    shared_camera.stop_all()
    assert shared_camera.running(spec) is None
    at.run()
    assert f"`{spec}` is no longer running" in messages(at)
    start_server_source(at, spec)
    second = shared_camera.running(spec)
    assert second is not None and second is not first and second.alive and not messages(at)


def test_a_video_file_as_server_source_loops(monkeypatch, tmp_path, model, cameras):
    clip = write_clip(tmp_path / "loop.avi", [picture_of_blocks(48, 64)] * 3, fps=30)
    at = start_server_source(app(monkeypatch, model, source="server"), str(clip))
    assert not messages(at)
    worker = shared_camera.running(str(clip))
    wait_for(lambda: worker.meter.snapshot()["frames"] > 7, what="the clip to play past its end")
    assert worker.alive and worker.error is None


@pytest.fixture
def routes_server(cameras):
    """The demo's own routes (MJPEG stream, stats) served by uvicorn on 127.0.0.1, in this process,
    so the test can start workers directly and talk to them over real HTTP."""
    import socket

    import uvicorn
    from starlette.applications import Starlette

    from dilseg.demo.routes import ROUTES

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=ROUTES), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="uvicorn to start")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def get_json(url: str) -> tuple[int, dict]:
    import json
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, json.load(r)


def test_stats_json_answers_for_a_folder_source_with_a_corrupt_image(tmp_path, routes_server, segmenter):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"f{i}.png"), picture_of_blocks(48, 64))
    (folder / "f1b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    worker = shared_camera.acquire(str(folder), segmenter)
    wait_for(lambda: worker.stats()["corrupt_skipped"] >= 1, what="the folder to be read past its corrupt image")
    status, body = get_json(routes_server + "/dilseg/stats.json")
    assert status == 200
    stats = body["cameras"]["workers"][str(folder)]
    assert stats["alive"] and stats["error"] is None
    # Counters have one type everywhere: ints, named as in `dilseg run`'s summary.
    for key in ("frames_in", "frames_out", "dropped", "corrupt_skipped", "reopens"):
        assert isinstance(stats[key], int), key
    assert stats["corrupt_skipped"] >= 1 and stats["frames_out"] >= 1


def read_mjpeg_frames(response, n: int) -> list[bytes]:
    """The next ``n`` JPEGs of a multipart/x-mixed-replace response (fewer if it ends)."""
    frames = []
    while len(frames) < n:
        line = response.readline()
        if not line:
            break
        if line.lower().startswith(b"content-length:"):
            size = int(line.split(b":")[1])
            response.readline()
            frames.append(response.read(size))
    return frames


def test_a_viewer_holds_one_stream_and_abandoned_views_are_not_drawn(routes_server, segmenter):
    import http.client
    from urllib.parse import urlsplit

    from dilseg.runtime.view import ViewSettings

    spec = "test://96x64?fps=25"
    worker = shared_camera.acquire(spec, segmenter)
    host = urlsplit(routes_server).netloc

    def open_stream(view: str, viewer: str):
        conn = http.client.HTTPConnection(host, timeout=10)
        conn.request("GET", f"/dilseg/stream/{worker.id}.mjpg?{ViewSettings(view).to_query()}&viewer={viewer}")
        response = conn.getresponse()
        assert response.status == 200
        return conn, response

    tab_a = [open_stream("overlay", "tab-a")]
    first = read_mjpeg_frames(tab_a[0][1], 2)
    assert len(first) == 2 and cv2.imdecode(np.frombuffer(first[0], np.uint8), cv2.IMREAD_COLOR).shape == (64, 96, 3)
    tab_b = open_stream("overlay", "tab-b")
    for view in ("mask", "side-by-side", "overlay", "mask"):  # tab a changes its view four times
        tab_a.append(open_stream(view, "tab-a"))
        assert len(read_mjpeg_frames(tab_a[-1][1], 2)) == 2
    # Each earlier stream of tab a has ended (its response is complete), the newest one is live.
    for _, response in tab_a[:-1]:
        read_mjpeg_frames(response, 1000)  # returns at the end of the response (an open one would time out)
        assert response.read() == b""
    stats = worker.stats()
    assert stats["connections"] == 2 and worker.viewer_stats("tab-a")["streams"] == 1
    # The counters anyone can read name no viewer: a tab's id would let a reader end its stream.
    _, public = get_json(routes_server + "/dilseg/stats.json")
    shown = public["cameras"]["workers"][spec]
    assert "tab-a" not in json.dumps(public) and "tab-b" not in json.dumps(public)
    assert sorted(v["streams"] for v in shown["viewers"]) == [1, 1]
    assert {s.settings.view for s in worker.publisher._streams} == {"mask", "overlay"}
    assert stats["views"] == 2  # mask (tab a) and overlay (tab b): nothing drawn for abandoned views
    last = read_mjpeg_frames(tab_a[-1][1], 1)[0]
    wanted = worker.latest()
    assert ViewSettings("mask") in wanted.jpegs and ViewSettings("side-by-side") not in wanted.jpegs
    assert cv2.imdecode(np.frombuffer(last, np.uint8), cv2.IMREAD_COLOR).shape == (64, 96, 3)
    # Tab a shows another source: its stream here ends; then tab a stops: nothing more to end.
    other = shared_camera.acquire("test://32x24?fps=5", segmenter)
    assert shared_camera.release_viewer("tab-a", keep=other) == 1
    assert shared_camera.release_viewer("tab-a") == 0
    read_mjpeg_frames(tab_a[-1][1], 1000)
    assert tab_a[-1][1].read() == b""
    wait_for(lambda: worker.stats()["connections"] == 1, what="tab a's stream to close")
    assert len(read_mjpeg_frames(tab_b[1], 3)) == 3
    for conn, _ in tab_a + [tab_b]:
        conn.close()
    wait_for(lambda: worker.stats()["connections"] == 0, what="the server to see the last stream go")


# ---------------------------------------------------------------------------------- small parts


def test_view_settings_round_trip_through_the_stream_url():
    from dilseg.runtime.view import ViewSettings

    s = ViewSettings("side-by-side", 0.25, (0, 3, 7))
    assert ViewSettings.from_query(s.to_query()) == s
    assert ViewSettings.from_query(ViewSettings(legend=True).to_query()).legend
    assert ViewSettings.from_query("") == ViewSettings()
    with pytest.raises(ValueError, match="view must be one of"):
        ViewSettings.from_query("view=sepia")
    with pytest.raises(ValueError, match="alpha"):
        ViewSettings.from_query("alpha=3")


def test_ice_servers_default_to_none_and_come_from_the_launcher(monkeypatch):
    from dilseg.demo.cli import ice_servers_json
    from dilseg.demo.settings import ENV_ICE, ice_servers, rtc_configuration
    from dilseg.runtime.cli import CliError

    monkeypatch.delenv(ENV_ICE, raising=False)
    assert rtc_configuration() == {"iceServers": []}
    monkeypatch.setenv(ENV_ICE, ice_servers_json(["stun:stun.example.org:3478", "turn:turn.example.org"], "u", "p"))
    assert ice_servers() == [{"urls": ["stun:stun.example.org:3478"]},
                             {"urls": ["turn:turn.example.org"], "username": "u", "credential": "p"}]
    with pytest.raises(CliError, match="stun:"):
        ice_servers_json(["http://example.org"], None, None)
    monkeypatch.setenv(ENV_ICE, "[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        ice_servers()


def test_stats_hide_stream_credentials():
    assert shared_camera.redact("rtsp://admin:s3cret@10.0.0.2:554/live") == "rtsp://***@10.0.0.2:554/live"
    assert shared_camera.redact("test://640x480?fps=30") == "test://640x480?fps=30"


def test_meter_counts_frames_and_averages_stages():
    from dilseg.demo.meter import Meter

    m = Meter(window_s=5.0)
    for i in range(6):
        m.tick({"infer": 2.0 * (i % 2 + 1)} if i < 4 else {"infer": 3.0, "jpeg": 5.0})
        time.sleep(0.01)
    snap = m.snapshot()
    assert snap["frames"] == 6 and snap["latency_ms"] == {"infer": 3.0, "jpeg": 5.0}
    assert 20 < snap["fps"] < 120


def test_demo_command_help_and_errors(capsys, tmp_path):
    from dilseg.runtime.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "dilseg demo --port 8600 --model edge_m.onnx" in out and "--ice-server" in out
    assert main(["demo", "--model", str(tmp_path / "missing.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["demo", "--port", "70000"]) == 2


def test_demo_command_runs_streamlit_headless_without_telemetry():
    import argparse

    from dilseg.demo.cli import streamlit_command

    cmd = streamlit_command(argparse.Namespace(port=8642, address="127.0.0.1", max_upload_mb=64))
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("server.py") and Path(cmd[4]).is_file()
    joined = " ".join(cmd)
    assert "--server.headless true" in joined and "--server.port 8642" in joined
    assert "--browser.gatherUsageStats false" in joined and "--server.address 127.0.0.1" in joined
    assert "--server.maxUploadSize 64" in joined
