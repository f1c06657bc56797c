"""End to end: `dilseg demo` as a real server, driven by Debian's Chromium through Playwright.

Browser webcam: Chromium's fake camera plays a Y4M of known content; after START the
server's processed-frame counter (/dilseg/stats.json) must advance and the video coming
back must be the overlay of that content (pixels read from the <video> through a canvas,
compared with render() of the Segmenter's own output), not the raw camera picture.
Server camera: the same for `test://`, whose frame i is known exactly, plus the sharing
(a second tab adds a viewer, not a second open) and the displayed frame rate.
Screenshots land in test-artifacts/.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]
for _module in ("streamlit", "streamlit_webrtc", "av"):  # the server's needs; not imported here
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed (pip install -e .[demo])", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

from dilseg.runtime.postprocess import render  # noqa: E402
from dilseg.runtime.segmenter import Segmenter  # noqa: E402

CAMERA_SIZE = (240, 320)  # H, W of the fake webcam


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    from dilseg.export.onnx_export import export_onnx
    from dilseg.runtime.classes import PRESETS
    from dilseg.export.zoo import create_model

    # DILSEG_DEMO_TEST_MODEL=models/edge_m_camvid.onnx measures the page with the shipped model
    # (the FPS figures land in test-artifacts/); the default small model keeps CI quick.
    chosen = os.environ.get("DILSEG_DEMO_TEST_MODEL")
    if chosen:
        return Path(chosen).resolve()
    path = tmp_path_factory.getbasetemp() / "demo_edge_s_64x96.onnx"
    if not path.exists():
        torch.manual_seed(0)
        export_onnx(create_model("edge_s"), PRESETS["camvid"].model_meta("edge_s"), path, (64, 96))
    return path


@pytest.fixture(scope="module")
def segmenter(model) -> Segmenter:
    # The page's default backend is auto, which runs a model's int8 variant where the CPU has
    # VNNI: the reference is what auto runs for this model here.
    from dilseg.demo.loading import load_segmenter

    return load_segmenter(model, "auto")


def camera_picture() -> np.ndarray:
    """Four coloured quadrants and a white band: large flat areas survive VP8 well."""
    h, w = CAMERA_SIZE
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (40, 40, 220)
    img[: h // 2, w // 2:] = (200, 80, 20)
    img[h // 2:, : w // 2] = (40, 160, 60)
    img[h // 2:, w // 2:] = (0, 220, 255)
    img[h // 3: h // 3 + 16] = (245, 245, 245)
    return img


def write_y4m(path: Path, frame_bgr: np.ndarray, frames: int = 15, fps: int = 30) -> Path:
    h, w = frame_bgr.shape[:2]
    planes = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2YUV_I420).tobytes()
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for _ in range(frames):
            f.write(b"FRAME\n" + planes)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/dilseg/stats.json", timeout=5) as r:
        return json.load(r)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """`dilseg demo` on a free port, headless, with the test model."""
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(ARTIFACTS / "demo_server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dilseg.runtime.cli", "demo", "--port", str(port), "--address", "127.0.0.1",
         "--model", str(model)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"dilseg demo exited with {proc.returncode}; see {log.name}")
        try:
            return get_stats(url) is not None
        except OSError:
            return False

    try:
        wait_for(up, 90, "the demo server to answer")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    y4m = write_y4m(tmp_path_factory.mktemp("camera") / "camera.y4m", camera_picture())
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={y4m}"])
        yield b
        b.close()


def decode_data_url(url: str | None) -> np.ndarray | None:
    if not url or "," not in url:
        return None
    data = base64.b64decode(url.split(",", 1)[1])
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


GRAB = """(selector) => {
  const el = document.querySelector(selector);
  if (!el) return null;
  const w = el.videoWidth ?? el.naturalWidth, h = el.videoHeight ?? el.naturalHeight;
  if (!w || !h) return null;
  const c = document.createElement('canvas');
  c.width = w; c.height = h;
  c.getContext('2d').drawImage(el, 0, 0, w, h);
  return c.toDataURL('image/png');
}"""


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---------------------------------------------------------------------------------- tests


def test_browser_webcam_comes_back_segmented(server, browser, segmenter):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(server)
        page.get_by_text("Browser webcam").wait_for(timeout=60_000)
        webrtc = page.frame_locator("iframe[title*='webrtc']")
        webrtc.get_by_role("button", name="START").click(timeout=60_000)

        def processed() -> int:
            return max([s["frames"] for s in get_stats(server)["webcam"]] or [0])

        first = wait_for(lambda: processed() >= 10 and processed(), 60, "the server to process webcam frames")
        wait_for(lambda: processed() > first + 10, 30, "the processed-frame count to keep advancing")

        # What the server receives is the camera picture after I420 and VP8; compare what
        # comes back with the overlay of that picture and with the raw picture.
        raw = cv2.cvtColor(cv2.cvtColor(camera_picture(), cv2.COLOR_BGR2YUV_I420), cv2.COLOR_YUV2BGR_I420)
        expected = render(raw, segmenter(raw).labels, segmenter.meta, "overlay", 0.5)
        assert mean_diff(expected, raw) > 25, "test precondition: the overlay must look unlike the raw picture"
        frame = next(f for f in page.frames if "webrtc" in f.url)
        best = None

        def matches():
            nonlocal best
            shown = decode_data_url(frame.evaluate(GRAB, "video"))
            if shown is None:
                return False
            shown = cv2.resize(shown, (raw.shape[1], raw.shape[0]), interpolation=cv2.INTER_AREA)
            got = (mean_diff(shown, expected), mean_diff(shown, raw))
            best = got if best is None or got[0] < best[0] else best
            return got[0] < 14

        try:
            wait_for(matches, 30, "the returned video to show the overlay")
        finally:
            page.screenshot(path=str(ARTIFACTS / "demo_browser_webcam.png"), full_page=True)
        to_overlay, to_raw = best
        print(f"\nwebcam: returned video differs from the overlay by {to_overlay:.1f}, from the raw picture by {to_raw:.1f}")
        assert to_overlay < to_raw / 2, f"returned video is closer to the raw camera ({to_raw:.1f}) than expected"
        assert page.get_by_text("Frames processed").is_visible()
        webrtc.get_by_role("button", name="STOP").click()
    finally:
        page.close()


def start_server_camera(browser, server: str, spec: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server)
    page.get_by_text("Server camera or stream").click(timeout=60_000)
    box = page.get_by_role("textbox", name="Camera or stream")
    box.fill(spec)
    box.press("Enter")
    page.get_by_role("button", name="Start").click()
    page.wait_for_selector("img#dilseg-stream", timeout=60_000)
    return page


def worker_stats(server: str, spec: str) -> dict:
    """The stats.json entry of the shared worker for ``spec`` ({} when none runs)."""
    return get_stats(server)["cameras"]["workers"].get(spec) or {}


def frames_shown(server: str, spec: str) -> int:
    """MJPEG frames sent to every viewer of ``spec`` so far."""
    return sum(v["frames"] for v in worker_stats(server, spec).get("viewers", []))


def test_server_camera_is_shared_segmented_and_fast(server, browser, segmenter):
    from dilseg.runtime.sources import test_frame

    spec = "test://640x480?fps=30"
    page = start_server_camera(browser, server, spec)
    second = None
    worker, viewers_frames = partial(worker_stats, server, spec), partial(frames_shown, server, spec)
    try:
        wait_for(lambda: viewers_frames() >= 30, 60, "MJPEG frames to reach the page")

        # Displayed frame rate: frames sent to this tab's stream over a few seconds, next to
        # what the worker processed meanwhile.
        w0, v0, t0 = worker()["frames"], viewers_frames(), time.monotonic()
        time.sleep(4.0)
        w1, v1, t1 = worker()["frames"], viewers_frames(), time.monotonic()
        processed_fps, displayed_fps = (w1 - w0) / (t1 - t0), (v1 - v0) / (t1 - t0)
        (ARTIFACTS / "demo_server_camera_fps.json").write_text(json.dumps(
            {"spec": spec, "processed_fps": processed_fps, "displayed_fps": displayed_fps}, indent=1))
        print(f"\n{spec}: processed {processed_fps:.1f} FPS, displayed {displayed_fps:.1f} FPS")
        # The stream must not lose most of what the worker makes, and where inference keeps up
        # with the 30 FPS source (a machine not swamped by other work) it must show >= 25 FPS.
        assert displayed_fps >= 0.75 * processed_fps and displayed_fps >= 8, (
            f"displayed {displayed_fps:.1f} FPS while the worker processed {processed_fps:.1f} FPS")
        if processed_fps >= 27:
            assert displayed_fps >= 25, f"inference kept up ({processed_fps:.1f} FPS) but only {displayed_fps:.1f} shown"

        # The picture in the page is the overlay of test:// frame i for an i near the worker's.
        best = None

        def matches():
            nonlocal best
            shown = decode_data_url(page.evaluate(GRAB, "img#dilseg-stream"))
            latest = worker().get("latest_index")
            if shown is None or latest is None:
                return False
            scores = []
            for i in range(max(0, latest - 40), latest + 3):
                raw = test_frame(i, 640, 480)
                want = render(raw, segmenter(raw).labels, segmenter.meta, "overlay", 0.5)
                scores.append((mean_diff(shown, want), mean_diff(shown, raw), i))
            got = min(scores)
            best = got if best is None or got[0] < best[0] else best
            return got[0] < 8

        try:
            wait_for(matches, 30, "the stream to show the overlay of a test:// frame")
        finally:
            page.screenshot(path=str(ARTIFACTS / "demo_browser_server_camera.png"), full_page=True)
        to_overlay, to_raw, index = best
        print(f"server camera: frame {index} differs from its overlay by {to_overlay:.1f}, from the raw frame by {to_raw:.1f}")
        assert to_overlay < to_raw / 3, f"frame {index}: stream closer to the raw frame ({to_raw:.1f}) than expected"

        # A second tab on the same source adds a viewer; the source is not opened again.
        opened = get_stats(server)["cameras"]["opened"][spec]
        second = start_server_camera(browser, server, spec)
        wait_for(lambda: worker().get("connections") == 2 and len(worker()["viewers"]) == 2, 30,
                 "the second tab's stream")
        v2 = viewers_frames()
        wait_for(lambda: all(v["frames"] > 5 for v in worker()["viewers"]) and viewers_frames() > v2 + 20,
                 30, "both tabs to receive frames")
        assert get_stats(server)["cameras"]["opened"][spec] == opened == 1
        second.screenshot(path=str(ARTIFACTS / "demo_browser_server_camera_tab2.png"), full_page=True)

        # A hand-edited stream URL asking for classes the model lacks is refused, and the
        # shared worker keeps serving the two tabs.
        src = page.evaluate("document.querySelector('img#dilseg-stream').src")
        base = src.split("?", 1)[0]
        for bad in ("classes=11", "classes=300", "classes=-1", "classes=road", "alpha=2"):
            try:
                urllib.request.urlopen(f"{base}?{bad}", timeout=5)
                code = 200
            except urllib.error.HTTPError as exc:
                code, body = exc.code, exc.read().decode()
            assert code == 400, f"{bad}: answered {code}"
            assert "bad view settings" in body
        before = viewers_frames()
        wait_for(lambda: viewers_frames() > before + 10 and worker().get("alive", True), 20,
                 "the worker to keep serving after refused requests")
    finally:
        page.close()
        if second is not None:
            second.close()


def test_view_changes_hold_one_stream_per_tab_and_stop_closes_it(server, browser):
    """Ten changes of view or alpha: the server holds one MJPEG stream for the tab (each change
    is a new URL; the server ends the tab's previous stream), draws only the view shown, the
    picture stays live, and after Stop no stream of the tab stays open."""
    spec = "test://320x240?fps=15"
    page = start_server_camera(browser, server, spec)
    worker, shown = partial(worker_stats, server, spec), partial(frames_shown, server, spec)
    try:
        wait_for(lambda: shown() >= 5, 60, "MJPEG frames to reach the page")
        sidebar = page.locator("section[data-testid='stSidebar']")
        slider = sidebar.get_by_role("slider")
        changes = [("view", "mask"), ("alpha", "0.55"), ("view", "side-by-side"), ("alpha", "0.60"),
                   ("view", "overlay"), ("view", "mask"), ("alpha", "0.65"), ("view", "overlay"),
                   ("alpha", "0.70"), ("view", "side-by-side")]
        for what, value in changes:
            if what == "view":
                sidebar.get_by_text(value, exact=True).click()
            else:
                slider.focus()
                slider.press("ArrowRight")  # one 0.05 step
            page.wait_for_function(
                "(s) => (document.querySelector('img#dilseg-stream')?.src || '').includes(s)",
                arg=f"{what}={value}", timeout=30_000)
        assert "view=side-by-side" in page.evaluate("document.querySelector('img#dilseg-stream').src")

        def one_stream():
            w = worker()
            viewers = [v for v in w.get("viewers", []) if v["streams"]]
            return w.get("connections") == 1 and len(viewers) == 1 and viewers[0]["streams"] == 1 and w["views"] == 1
        wait_for(one_stream, 20, "the server to hold one stream for the tab")
        # Still live after the changes: new frames arrive and the picture moves.
        def grab() -> np.ndarray:
            got = []
            wait_for(lambda: got.append(decode_data_url(page.evaluate(GRAB, "img#dilseg-stream"))) or
                     got[-1] is not None, 20, "the page's picture to be drawn")
            return got[-1]

        before = shown()
        first = grab()
        time.sleep(1.5)
        second = grab()
        assert shown() > before + 5, "the stream stopped delivering frames after the view changes"
        assert first.shape == second.shape == (240, 640, 3)  # side by side
        assert mean_diff(first, second) > 0.5, "the picture in the page did not change"
        page.screenshot(path=str(ARTIFACTS / "demo_browser_view_changes.png"), full_page=True)
        stats = worker()
        print(f"\nafter {len(changes)} view changes: {stats['connections']} open stream(s), {stats['views']} view(s) "
              f"drawn, render {stats['latency_ms'].get('render', 0):.1f} ms")

        page.get_by_role("button", name="Stop").click()
        wait_for(lambda: worker().get("connections", 0) == 0, 15, "Stop to close the tab's stream")
    finally:
        page.close()
