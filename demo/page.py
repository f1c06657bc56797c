"""The demo page: sidebar choices, then one of four sources (browser webcam, server camera or
stream, uploaded image, uploaded video) and the live panel.

Every failure the user can cause (missing model, wrong file, missing camera) ends as a
message on the page; the rest of the page keeps working.
"""

from __future__ import annotations

import hashlib
import html
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import streamlit as st

from dilseg.runtime.errors import DilsegError
from dilseg.runtime.metadata import ModelMeta
from dilseg.runtime.postprocess import VIEWS, class_areas
from dilseg.runtime.segmenter import Segmenter
from dilseg.runtime.view import ViewSettings

from . import shared_camera
from .loading import (ModelChoiceError, auto_choice, backend_options, check_model, launch_model, load_segmenter, load_served,
                      missing_default_message, save_upload)
from .media import IMAGE_TYPES, VIDEO_TYPES, MediaError, decode_image, segment_image, segment_video
from .settings import ENV_SOURCE, rtc_configuration
from .webcam import WebcamProcessor

SOURCES = {
    "webcam": "Browser webcam",
    "server": "Server camera or stream",
    "image": "Upload image",
    "video": "Upload video",
}
MODEL_KINDS = {"default": "Default model", "path": "Model file path", "upload": "Upload .onnx",
               "triton": "Triton server"}
SOURCE_HELP = ("What the server opens: a camera index (`0`), a stream URL (`rtsp://…`, `http://…`), "
               "a Jetson CSI camera (`csi://0`), a video file path, or the synthetic `test://` "
               "(`test://640x480?fps=30`). One worker per source serves every open tab.")


def session_id() -> str:
    """A name for this browser session in URLs and stats: a hash, so the stats route does not
    publish Streamlit's session ids."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return hashlib.sha1((ctx.session_id if ctx else "local").encode()).hexdigest()[:12]


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def cached_segmenter(path: str, stamp: tuple[int, int], backend_key: str) -> Segmenter:
    # ``stamp`` (mtime, size) makes a rewritten file load afresh. Failures raise and are not cached.
    return load_segmenter(Path(path), backend_key)


# -- sidebar -------------------------------------------------------------------------------------
def choose_model() -> Path | str | None:
    sb = st.sidebar
    sb.header("Model")
    launch_path, origin = launch_model()
    kind = sb.radio("Model", list(MODEL_KINDS), format_func=MODEL_KINDS.get, key="model_kind",
                    label_visibility="collapsed")
    if kind == "default":
        sb.caption(f"`{launch_path}` ({origin})")
        if isinstance(launch_path, str):  # a triton:// URL
            return launch_path
        if not launch_path.exists():
            if origin == "shipped default":
                sb.warning(missing_default_message(launch_path))
            else:
                sb.error(f"`{launch_path}` (given with --model) does not exist.")
            return None
        return launch_path
    if kind == "path":
        text = sb.text_input("Model file (.onnx or .engine)", key="model_path",
                             placeholder="/path/to/model.onnx").strip()
        return Path(text).expanduser() if text else None
    if kind == "triton":
        text = sb.text_input("Model served by Triton", key="model_url",
                             placeholder="triton://127.0.0.1:8001/edge_m").strip()
        return text or None
    upload = sb.file_uploader("A dilseg .onnx model", type=["onnx"], key="model_upload")
    if upload is None:
        return None
    try:
        return save_upload(upload.name, upload.getvalue())
    except ModelChoiceError as exc:
        sb.error(str(exc))
        return None


def choose_backend() -> str:
    sb = st.sidebar
    options = backend_options()
    available = [o for o in options if not o.reason]
    labels = {o.key: o.label for o in options}
    key = sb.radio("Backend", [o.key for o in available], format_func=labels.get, key="backend")
    missing = [o for o in options if o.reason]
    if missing:
        # Shown but not selectable, each with the reason it cannot run on this machine.
        sb.radio("Unavailable here", [o.label for o in missing], captions=[o.reason for o in missing],
                 index=None, disabled=True, key="backend_unavailable")
    return key


@st.cache_resource(max_entries=4, show_spinner="Connecting to Triton…")
def cached_served(url: str) -> Segmenter:
    return load_served(url)


def load_model(path: Path | str | None, backend_key: str) -> Segmenter | None:
    if path is None:
        return None
    try:
        if isinstance(path, str):  # a model served by Triton; the sidebar's backend does not apply
            segmenter = cached_served(path)
        else:
            check_model(path)
            stat = path.stat()
            segmenter = cached_segmenter(str(path.resolve()), (stat.st_mtime_ns, stat.st_size), backend_key)
    except ModelChoiceError as exc:
        st.sidebar.error(str(exc))
        return None
    meta = segmenter.meta
    size = "any size" if meta.input_size is None else f"{meta.input_size[0]}x{meta.input_size[1]}"
    providers = getattr(segmenter.backend, "providers", None)
    where = ", ".join(p.replace("ExecutionProvider", "") for p in providers) if providers else \
        str(getattr(segmenter.backend, "url", segmenter.backend.name))
    st.sidebar.caption(f"**{meta.model}** · input {size} · {meta.precision} · {meta.num_classes} classes · {where}")
    choice = auto_choice(path) if backend_key == "auto" and not isinstance(path, str) else None
    if choice is not None:
        st.sidebar.caption(choice.describe())
    return segmenter


def choose_view(meta: ModelMeta | None) -> ViewSettings:
    sb = st.sidebar
    sb.header("View")
    view = sb.radio("View", VIEWS, horizontal=True, key="view", label_visibility="collapsed")
    alpha = sb.slider("Mask opacity (alpha)", 0.0, 1.0, 0.5, 0.05, key="alpha")
    visible = None
    if meta is not None:
        ids = list(range(meta.num_classes))
        # Keyed by the class list, so switching to a model with other classes starts fresh.
        chosen = sb.multiselect("Classes to show", ids, default=ids, format_func=lambda c: meta.classes[c],
                                key="classes-" + "|".join(meta.classes))
        visible = None if len(chosen) == len(ids) else tuple(sorted(chosen))
    return ViewSettings(view=view, alpha=float(alpha), visible=visible)


def choose_source() -> str:
    st.sidebar.header("Source")
    return st.sidebar.radio("Source", list(SOURCES), format_func=SOURCES.get, key="source",
                            label_visibility="collapsed")


# -- panels --------------------------------------------------------------------------------------
def legend_html(meta: ModelMeta, areas, visible: tuple[int, ...] | None) -> str:
    rows = []
    for c in (range(meta.num_classes) if visible is None else visible):
        r, g, b = meta.palette[c]
        share = "" if areas is None else f"{areas[c]:5.1f}%"
        rows.append(f'<div class="dilseg-legend-row"><span style="display:inline-block;width:0.9em;height:0.9em;'
                    f'background:rgb({r},{g},{b});border:1px solid #8888;margin-right:0.4em"></span>'
                    f'{html.escape(meta.classes[c])} <code>{share}</code></div>')
    return '<div class="dilseg-legend">' + "".join(rows) + "</div>"


def latency_table(latency: dict[str, float]) -> None:
    if latency:
        st.markdown("| stage | ms |\n|---|---:|\n" + "\n".join(f"| {k} | {v:.1f} |" for k, v in latency.items()))


def show_panel(snap: dict, labels, meta: ModelMeta | None, visible, displayed: dict | None = None) -> None:
    cols = st.columns(3 if displayed is not None else 2)
    cols[0].metric("Processed FPS", f"{snap['fps']:.1f}")
    cols[1].metric("Frames processed", snap["frames"])
    if displayed is not None:
        cols[2].metric("Displayed FPS", f"{displayed.get('fps', 0.0):.1f}",
                       help="Frames per second sent to this tab's stream")
    latency = dict(snap.get("latency_ms", {}))
    if displayed:
        latency.update(displayed.get("latency_ms", {}))
    latency_table(latency)
    if meta is not None:
        areas = class_areas(labels, meta.num_classes) if labels is not None else None
        st.markdown(legend_html(meta, areas, visible), unsafe_allow_html=True)
    history = snap.get("fps_history") or []
    if len(history) > 1:
        st.line_chart(pd.DataFrame(history, columns=["seconds", "FPS"]).set_index("seconds"), height=140)


@st.fragment(run_every=1.0)
def webcam_panel(visible) -> None:
    proc: WebcamProcessor | None = st.session_state.get("webcam_processor")
    if proc is None:
        return
    if proc.error:
        st.error(f"Processing failed: {proc.error}")
    labels, meta = proc.latest if proc.latest else (None, proc.segmenter.meta if proc.segmenter else None)
    show_panel(proc.meter.snapshot(), labels, meta, visible)


@st.fragment(run_every=1.0)
def server_panel(spec: str, viewer: str, visible) -> None:
    worker = shared_camera.running(spec)
    if worker is None:
        error = shared_camera.last_error(spec)
        st.warning(f"The source stopped: {error}" if error else "The source is not running; press Start.")
        return
    worker.touch()
    latest = worker.latest()
    stats = worker.stats()
    show_panel(stats, latest.labels if latest else None, latest.meta if latest else worker.segmenter.meta,
               visible, displayed=worker.viewer_stats(viewer))
    st.caption(f"{stats['connections']} open stream(s) share this source.")


# -- sources -------------------------------------------------------------------------------------
def webcam_source(segmenter: Segmenter, settings: ViewSettings) -> None:
    from streamlit_webrtc import WebRtcMode, webrtc_streamer

    proc = st.session_state.get("webcam_processor")
    if proc is None:
        proc = st.session_state["webcam_processor"] = WebcamProcessor(session_id())
    proc.segmenter, proc.settings = segmenter, settings
    try:
        rtc = rtc_configuration()
    except ValueError as exc:
        st.error(str(exc))
        return
    video, panel = st.columns([3, 2])
    with video:
        st.caption("Press START and allow the camera; frames go to this server, come back segmented.")
        webrtc_streamer(key="webcam", mode=WebRtcMode.SENDRECV, rtc_configuration=rtc,
                        video_frame_callback=proc, media_stream_constraints={"video": True, "audio": False},
                        video_html_attrs={"autoPlay": True, "muted": True, "controls": False,
                                          "style": {"width": "100%"}},
                        async_processing=True)
    with panel:
        webcam_panel(settings.visible)


def server_source(segmenter: Segmenter, settings: ViewSettings) -> None:
    video, panel = st.columns([3, 2])
    with video:
        spec = st.text_input("Camera or stream", value=os.environ.get(ENV_SOURCE, "0"), key="server_spec",
                             help=SOURCE_HELP).strip()
        start, stop = st.columns(2)
        if start.button("Start", key="server_start", type="primary", width="stretch"):
            try:
                worker = shared_camera.acquire(spec, segmenter)
                st.session_state["server_running"] = worker.spec
            except Exception as exc:  # a DilsegError carries a readable message; anything else gets its type
                msg = str(exc) if isinstance(exc, DilsegError) else f"{type(exc).__name__}: {exc}"
                st.error(f"Cannot open `{spec}`: {msg}")
                st.session_state["server_running"] = None
        if stop.button("Stop", key="server_stop", width="stretch"):
            st.session_state["server_running"] = None
        running = st.session_state.get("server_running")
        worker = shared_camera.running(running) if running else None
        if running and worker is None:
            error = shared_camera.last_error(running)
            st.error(f"`{running}` stopped: {error}" if error else f"`{running}` is no longer running; press Start.")
            st.session_state["server_running"] = None
            running = None
        if worker is None:
            shared_camera.release_viewer(session_id())  # Stop, or the source ended: no stream stays open
        else:
            worker.set_segmenter(segmenter)
            viewer = session_id()
            shared_camera.release_viewer(viewer, keep=worker)  # a stream of the source shown before
            # A changed view is a new URL, so the browser opens a new stream; the server then ends
            # this tab's previous one (one stream per tab and source).
            url = f"dilseg/stream/{worker.id}.mjpg?{settings.to_query()}&viewer={viewer}"
            st.html(f'<img id="dilseg-stream" alt="segmented stream of {html.escape(running)}" '
                    f'src="{html.escape(url)}" style="width:100%;border-radius:4px">')
            st.caption("Every tab watching this source shares one capture-and-inference worker (with the model "
                       "chosen last). Stop closes this tab's stream; the source closes once no tab has watched "
                       f"it for {shared_camera.IDLE_S:.0f} s.")
    if running:
        with panel:
            server_panel(running, session_id(), settings.visible)


def image_source(segmenter: Segmenter, settings: ViewSettings) -> None:
    upload = st.file_uploader("Image", type=IMAGE_TYPES, key="image_upload")
    if upload is None:
        st.info("Upload a picture to segment it.")
        return
    try:
        image = decode_image(upload.name, upload.getvalue())
    except MediaError as exc:
        st.error(str(exc))
        return
    try:
        result = segment_image(image, segmenter, settings)
    except Exception as exc:  # noqa: BLE001 - the page must stay usable whatever the backend raises
        st.error(f"Segmenting {upload.name} failed: {type(exc).__name__}: {exc}. Try another model or backend.")
        return
    stem = Path(upload.name).stem
    picture, panel = st.columns([3, 2])
    with picture:
        st.image(result.picture, channels="BGR", caption=f"{upload.name}: {settings.view}")
        a, b, c = st.columns(3)
        a.download_button("Colour mask (PNG)", result.mask_png, f"{stem}_mask.png", "image/png", key="dl_mask",
                          on_click="ignore")
        b.download_button("Label PNG (class ids)", result.labels_png, f"{stem}_labels.png", "image/png",
                          key="dl_labels", on_click="ignore")
        c.download_button("Picture (PNG)", result.picture_png, f"{stem}_{settings.view}.png", "image/png",
                          key="dl_picture", on_click="ignore")
    with panel:
        latency_table(result.timings)
        st.markdown(legend_html(segmenter.meta, result.areas, settings.visible), unsafe_allow_html=True)


def video_source(segmenter: Segmenter, settings: ViewSettings, model_key: tuple) -> None:
    upload = st.file_uploader("Video", type=VIDEO_TYPES, key="video_upload")
    if upload is None:
        st.info("Upload a video: every frame is segmented, then the result plays here and can be downloaded.")
        return
    job = (upload.file_id, model_key, settings)
    done = st.session_state.get("video_result")
    if done is None or done[0] != job:
        st.session_state.pop("video_result", None)
        folder = Path(tempfile.mkdtemp(prefix="dilseg-demo-upload-"))
        path = folder / Path(upload.name).name
        path.write_bytes(upload.getvalue())
        bar = st.progress(0.0, text="Segmenting…")
        shown = [0.0]

        def progress(i: int, n: int) -> None:
            # A few updates a second: one per frame would flood the browser connection.
            if time.monotonic() - shown[0] > 0.2:
                shown[0] = time.monotonic()
                bar.progress(min(i / n, 1.0), text=f"Segmenting frame {i} of {n}")

        try:
            result = segment_video(path, segmenter, settings, progress=progress, out_dir=folder, name=upload.name)
            data = result.path.read_bytes()
        except DilsegError as exc:  # an undecodable upload, a full disk: said as it is
            bar.empty()
            st.error(str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a backend or encoder failure mid-video
            bar.empty()
            st.error(f"Segmenting {upload.name} failed: {type(exc).__name__}: {exc}. Try another model or backend.")
            return
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the result now lives in the session
        skipped = f"; {result.skipped} corrupt frame(s) skipped" if result.skipped else ""
        bar.progress(1.0, text=f"Done: {result.frames} frames in {result.seconds:.1f} s{skipped}")
        st.session_state["video_result"] = (job, result, data)
    _, result, data = st.session_state["video_result"]
    if result.skipped:
        st.warning(f"{upload.name}: {result.skipped} frame(s) could not be decoded (corrupt) and were left out; "
                   f"the other {result.frames} are in the result.")
    video, panel = st.columns([3, 2])
    with video:
        st.video(data, format="video/mp4")
        st.download_button("Download the segmented video (MP4)", data, result.path.name, "video/mp4",
                           key="dl_video", on_click="ignore")
    with panel:
        st.metric("Frames", result.frames)
        st.metric("Processing FPS", f"{result.frames / max(result.seconds, 1e-6):.1f}")
        st.caption("Mean share of each class over the video")
        st.markdown(legend_html(segmenter.meta, result.areas, settings.visible), unsafe_allow_html=True)


def main() -> None:
    st.set_page_config(page_title="dilseg demo", page_icon="🛣️", layout="wide")
    st.title("dilseg: live semantic segmentation")
    path = choose_model()
    backend_key = choose_backend()
    segmenter = load_model(path, backend_key)
    settings = choose_view(segmenter.meta if segmenter else None)
    source = choose_source()
    if source != "server" or segmenter is None:
        shared_camera.release_viewer(session_id())  # the page no longer shows a server stream
    if segmenter is None:
        launch_path, _ = launch_model()
        if st.session_state.get("model_kind", "default") == "default" and isinstance(launch_path, Path) \
                and not launch_path.exists():
            st.info(missing_default_message(launch_path))
        else:
            st.info("Choose a model in the sidebar to start.")
        return
    if source == "webcam":
        webcam_source(segmenter, settings)
    elif source == "server":
        server_source(segmenter, settings)
    elif source == "image":
        image_source(segmenter, settings)
    else:
        video_source(segmenter, settings, (str(path), backend_key))
