"""Real faults, made for real: full disks (a small tmpfs), HTTP and RTSP servers on 127.0.0.1
dropped and restarted mid-run, corrupt AVIs over a file and over HTTP, a PNG decompression
bomb on the command line and on the demo page, outputs that are inputs (through symlinks and
hard links), models whose metadata lies, signals, memory limits, and the GStreamer source path
(the pipeline `csi://N` builds, with the camera element swapped for videotestsrc, run by
Debian's OpenCV, which has GStreamer).

Each test runs `dilseg` as a user would (a subprocess where exit status, signals or memory
limits matter) on a tiny ONNX model built here (a 1x1 convolution and an ArgMax with dilseg's
metadata), so a run takes about a second. Videos are checked by decoding them with OpenCV.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from servers import swap_csi_camera

PY = sys.executable
H, W = 64, 96  # the tiny model's input
CLASSES = [f"class{i}" for i in range(11)]
PALETTE = [[(37 * i) % 256, (91 * i) % 256, (53 * i + 40) % 256] for i in range(11)]


# ---------------------------------------------------------------------------------- helpers

def dilseg(*args, timeout: float = 60, env: dict | None = None, limit_as: int | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`dilseg ARGS` in a child process, output captured; ``limit_as``: address-space limit (bytes)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))

    return subprocess.run([PY, "-m", "dilseg.runtime.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd, stdin=subprocess.DEVNULL,
                          preexec_fn=limit if limit_as else None)


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    """The run failed with exit status 2 and a single `dilseg CMD: error:` line holding ``words``."""
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, r.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def decoded_frames(path: Path) -> int:
    """Frames OpenCV really decodes from a video (not what its header claims)."""
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def tiny_model(path: Path, channels: int = 11, input_size: tuple[int, int] | None = (H, W),
               graph_size: tuple[int, int] = (H, W)) -> Path:
    """An ONNX with dilseg metadata: a seeded 1x1 convolution to ``channels`` scores and an ArgMax.
    ``channels`` beyond the 11 listed classes makes a model predicting ids its metadata lacks;
    ``input_size`` other than ``graph_size`` makes metadata that disagrees with the graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from dilseg.export.onnx_meta import attach_metadata
    from dilseg.runtime.metadata import ModelMeta

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 1, (channels, 3, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["scores"]),
         helper.make_node("ArgMax", ["scores"], ["labels"], axis=1, keepdims=0)],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, *graph_size])],
        [helper.make_tensor_value_info("labels", TensorProto.INT64, [1, *graph_size])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    meta = ModelMeta(model="tiny", classes=tuple(CLASSES), palette=tuple(map(tuple, PALETTE)),
                     input_size=input_size, ignore_index=11)
    attach_metadata(model, meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("faults") / "tiny.onnx")


def frames(n: int, h: int = 120, w: int = 160, noise: bool = False) -> list[np.ndarray]:
    from dilseg.runtime.sources import test_frame

    if noise:  # incompressible: fills a small disk quickly
        rng = np.random.default_rng(1)
        return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]
    return [test_frame(i, w, h) for i in range(n)]


def corrupt_avi(path: Path, write_video, bad=(10, 11, 12, 30, 31, 45), n: int = 60) -> Path:
    """An MJPEG AVI of ``n`` frames whose frames ``bad`` hold random bytes instead of a JPEG."""
    write_video(path, frames(n), fourcc="MJPG")
    data = bytearray(path.read_bytes())
    chunks, pos = [], data.find(b"00dc")
    while pos >= 0:
        size = int.from_bytes(data[pos + 4:pos + 8], "little")
        if size > 100:
            chunks.append((pos + 8, size))
        pos = data.find(b"00dc", pos + 8)
    assert len(chunks) == n, len(chunks)
    rng = np.random.default_rng(0)
    for k in bad:
        start, size = chunks[k]
        data[start:start + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def png_bomb(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A valid 1-bit greyscale PNG of width x height black pixels: ~110 kB on disk, 2.7 GB as BGR."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


class Lines:
    """A child's stderr read line by line in a thread, to act when something is printed."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline and self.proc.poll() is None, \
                f"no {text!r} within {timeout}s:\n{''.join(self.lines)}"
            time.sleep(0.05)

    @property
    def text(self) -> str:
        self.thread.join(timeout=10)
        return "".join(self.lines)


def during_run(tmp_path: Path, args, fault, timeout: float = 60) -> tuple[int, str, str]:
    """Start `dilseg ARGS`, call ``fault(proc)`` a second after it started segmenting, and wait for
    it to end: (exit status, stderr, stdout)."""
    with open(tmp_path / "stdout", "w") as out:
        proc = subprocess.Popen([PY, "-m", "dilseg.runtime.cli", *map(str, args)], stdout=out,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    err = Lines(proc)
    try:
        err.wait_for("dilseg run:")
        time.sleep(1.0)
        fault(proc)
        proc.wait(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, err.text, (tmp_path / "stdout").read_text()


# ---------------------------------------------------------------------------------- 1. decompression bombs

def test_png_bomb_is_refused_from_its_header_on_the_command_line(tmp_path, model):
    bomb = png_bomb(tmp_path / "bomb.png")
    t0 = time.monotonic()
    # 1.5 GiB of address space: decoding the bomb would need 2.7 GB, the refusal almost nothing.
    r = dilseg("run", "--model", model, "--source", bomb, "--labels", tmp_path / "out", limit_as=3 << 29)
    line = one_line_error(r, "bomb.png", "30000x30000", "megapixels", "DILSEG_MAX_IMAGE_PIXELS")
    assert time.monotonic() - t0 < 20, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # Raising the limit is honoured (and then the memory limit is what stops it, in one line too).
    r = dilseg("run", "--model", model, "--source", bomb, env={"DILSEG_MAX_IMAGE_PIXELS": "1e9"},
               limit_as=3 << 29)
    one_line_error(r, "memory")


def test_a_bomb_in_a_folder_is_skipped_counted_and_named(tmp_path, model):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames(3)):
        cv2.imwrite(str(folder / f"f{i}.png"), frame)
    png_bomb(folder / "f1b.png")
    r = dilseg("run", "--model", model, "--source", folder, "--labels", tmp_path / "labels", "--quiet",
               limit_as=3 << 29)
    assert r.returncode == 0, r.stderr
    assert "f1b.png" in r.stderr and "megapixels" in r.stderr
    assert "corrupt skipped 1" in r.stdout
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["f0.png", "f1.png", "f2.png"]


def test_a_huge_synthetic_source_is_refused_before_allocating(model):
    r = dilseg("run", "--model", model, "--source", "test://30000x30000", "--max-frames", "1", limit_as=3 << 29)
    one_line_error(r, "test://30000x30000", "megapixels", "DILSEG_MAX_IMAGE_PIXELS")


def demo_page(monkeypatch, model: Path, source: str):
    """The demo page through Streamlit's AppTest, on ``model``, with ``source`` chosen."""
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    import dilseg.demo.page as page

    monkeypatch.setenv("DILSEG_DEMO_MODEL", str(model))
    at = AppTest.from_file(str(Path(page.__file__).with_name("app.py")), default_timeout=60)
    at.session_state["source"] = source
    return at.run()


def test_png_bomb_upload_on_the_demo_page_is_refused_and_the_page_recovers(monkeypatch, tmp_path, model):
    at = demo_page(monkeypatch, model, "image")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data = png_bomb(tmp_path / "bomb.png").read_bytes()
    at.file_uploader(key="image_upload").upload("bomb.png", data, "image/png")
    at.run()
    assert not at.exception
    shown = "\n".join(e.value for e in at.error)
    assert "bomb.png" in shown and "megapixels" in shown and "DILSEG_MAX_IMAGE_PIXELS" in shown, shown
    # The page process did not decode it (2.7 GB): its high-water mark grew by far less.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # kB
    ok = cv2.imencode(".png", frames(1)[0])[1].tobytes()
    at.file_uploader(key="image_upload").set_value(("ok.png", ok, "image/png"))
    at.run()
    assert not at.error and at.get("download_button")


def test_a_huge_synthetic_server_source_on_the_demo_page_is_refused(monkeypatch, model):
    at = demo_page(monkeypatch, model, "server")
    from dilseg.demo import shared_camera

    try:
        at.text_input(key="server_spec").input("test://30000x30000")
        at.button(key="server_start").click().run()
        assert not at.exception
        shown = "\n".join(e.value for e in at.error)
        assert "30000x30000" in shown and "megapixels" in shown, shown
        assert shared_camera.running("test://30000x30000") is None
    finally:
        shared_camera.stop_all()


def test_demo_uploads_are_bounded_and_named_after_the_upload(tmp_path, monkeypatch):
    import tempfile

    from dilseg.demo.cli import streamlit_command
    from dilseg.demo.loading import UPLOADS_KEPT, ModelChoiceError, check_model, save_upload
    from dilseg.runtime.cli import main

    cmd = streamlit_command(argparse.Namespace(port=8501, address=None, max_upload_mb=50))
    assert cmd[cmd.index("--server.maxUploadSize") + 1] == "50"
    assert main(["demo", "--max-upload-mb", "0"]) == 2
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(ModelChoiceError, match=r"my_model\.onnx"):
        check_model(save_upload("my_model.onnx", b"not an onnx graph"))
    for i in range(UPLOADS_KEPT + 4):
        save_upload(f"m{i}.onnx", str(i).encode())
    kept = list((tmp_path / "dilseg-demo-models").iterdir())
    assert len(kept) == UPLOADS_KEPT and (tmp_path / "dilseg-demo-models").joinpath(
        hashlib.sha256(str(UPLOADS_KEPT + 3).encode()).hexdigest()[:16], f"m{UPLOADS_KEPT + 3}.onnx").exists()


# ---------------------------------------------------------------------------------- 2. full disk

@pytest.mark.parametrize("ext", [".mp4", ".avi"])
def test_full_disk_keeps_the_old_video_and_exits_non_zero_naming_the_file(tmp_path, small_tmpfs, write_video,
                                                                          model, ext):
    disk = small_tmpfs("256k")
    source = write_video(tmp_path / "noise.avi", frames(60, noise=True), fourcc="MJPG")
    out = disk / f"seg{ext}"
    write_video(out, frames(5), fourcc="mp4v" if ext == ".mp4" else "MJPG")  # a good file already there
    old = sha(out)
    r = dilseg("run", "--model", model, "--source", source, "--output", out, "--alpha", "0", "--quiet")
    assert r.returncode == 2, f"{r.returncode}\n{r.stdout}\n{r.stderr}"
    line = one_line_error(r, str(out), "no space left")
    assert "wrote" not in r.stdout, r.stdout
    assert sha(out) == old, "the good file at the output path was replaced"
    assert decoded_frames(out) == 5
    assert [p.name for p in disk.iterdir()] == [out.name], f"temporary files left: {list(disk.iterdir())} ({line})"


def test_one_full_sink_keeps_the_other_outputs_complete_and_says_so(tmp_path, small_tmpfs, write_video, model,
                                                                    video_frames):
    disk = small_tmpfs("256k")
    source = write_video(tmp_path / "noise.avi", frames(60, noise=True), fourcc="MJPG")
    video = tmp_path / "seg.mp4"
    r = dilseg("run", "--model", model, "--source", source, "--output", video, "--overlays", disk / "viz",
               "--labels", tmp_path / "labels", "--alpha", "0", "--quiet")
    line = one_line_error(r, "viz", "No space left")
    labels = len(list((tmp_path / "labels").iterdir()))
    assert 0 < labels < 60, line
    # The healthy outputs are finalised with the frames they got (the video also the one the
    # overlays failed on), and the run says which were kept.
    assert f"kept labels:{tmp_path / 'labels'} ({labels} frames, complete)" in r.stderr, r.stderr
    assert f"kept {video} ({labels + 1} frames, complete)" in r.stderr, r.stderr
    assert decoded_frames(video) == labels + 1
    assert "viz" not in "".join(line for line in r.stderr.splitlines() if "kept" in line)
    overlays = list((disk / "viz").iterdir())
    assert all(cv2.imread(str(p)) is not None for p in overlays), "a half-written overlay image was left"
    assert f"the {len(overlays)} images written before it failed are complete" in r.stderr, r.stderr


def test_an_export_onto_a_full_disk_names_the_file_and_leaves_nothing(small_tmpfs):
    from dilseg.runtime.defaults import default_model_path

    disk = small_tmpfs("64k")  # the shipped model is 4 MB
    r = dilseg("export", "onnx", "--from", default_model_path(), "--batch", "dynamic", "-o", disk / "batch.onnx")
    one_line_error(r, str(disk / "batch.onnx"), "No space left")
    assert list(disk.iterdir()) == []


# ---------------------------------------------------------------------------------- 3. outputs that are inputs

def test_an_output_that_is_the_input_video_is_refused_through_links(tmp_path, write_video, model):
    video = write_video(tmp_path / "v.mp4", frames(5))
    before = sha(video)
    (tmp_path / "link.mp4").symlink_to(video)
    os.link(video, tmp_path / "hard.mp4")
    (tmp_path / "dirlink").symlink_to(tmp_path)
    for out in (video, tmp_path / "link.mp4", tmp_path / "hard.mp4", tmp_path / "dirlink" / "v.mp4"):
        r = dilseg("run", "--model", model, "--source", video, "--output", out, "--quiet")
        one_line_error(r, "would overwrite the input")
    assert sha(video) == before and decoded_frames(video) == 5


@pytest.mark.parametrize("flag", ["--overlays", "--labels"])
def test_an_output_folder_that_is_the_source_folder_is_refused(tmp_path, model, flag):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames(2)):
        cv2.imwrite(str(folder / f"f{i}.png"), frame)
    cv2.imwrite(str(folder / "f0.jpg"), frames(1)[0])
    before = {p.name: sha(p) for p in folder.iterdir()}
    (tmp_path / "same").symlink_to(folder)
    for out in (folder, tmp_path / "same"):
        r = dilseg("run", "--model", model, "--source", folder, flag, out, "--quiet")
        one_line_error(r, "source folder")
    # One image whose output would land on a hard link of it, in another folder.
    other = tmp_path / "other"
    other.mkdir()
    ext = ".png" if flag == "--labels" else ".jpg"
    os.link(folder / f"f0{ext}", other / f"f0{ext}")
    r = dilseg("run", "--model", model, "--source", folder / f"f0{ext}", flag, other, "--quiet")
    one_line_error(r, "would overwrite the input")
    assert {p.name: sha(p) for p in folder.iterdir()} == before


# ---------------------------------------------------------------------------------- 5. corrupt frames

def test_corrupt_avi_frames_are_skipped_and_counted_from_a_file_and_over_http(tmp_path, write_video, model,
                                                                               http_server):
    avi = corrupt_avi(tmp_path / "corrupt.avi", write_video)
    server = http_server(tmp_path)
    for source in (avi, server.url("corrupt.avi")):
        r = dilseg("run", "--model", model, "--source", source, "--labels", tmp_path / f"l{len(str(source))}",
                   "--quiet")
        assert r.returncode == 0, r.stderr
        assert "frames in 54, out 54" in r.stdout and "corrupt skipped 6" in r.stdout, (source, r.stdout)
        assert "[mjpeg @" not in r.stderr, "FFmpeg's own log lines interleave with dilseg's"


def test_a_corrupt_video_upload_keeps_every_good_frame(tmp_path, write_video, model, video_frames):
    from dilseg.demo.media import segment_video
    from dilseg.runtime.segmenter import open_segmenter
    from dilseg.runtime.view import ViewSettings

    avi = corrupt_avi(tmp_path / "corrupt.avi", write_video)
    with open_segmenter(model) as seg:
        result = segment_video(avi, seg, ViewSettings(), out_dir=tmp_path)
    assert (result.frames, result.skipped) == (54, 6)
    assert len(video_frames(result.path)) == 54



def test_a_video_upload_onto_a_full_disk_fails_and_leaves_no_partial_file(tmp_path, small_tmpfs, write_video, model):
    from dilseg.demo.media import segment_video
    from dilseg.runtime.segmenter import open_segmenter
    from dilseg.runtime.sinks import SinkError
    from dilseg.runtime.view import ViewSettings

    disk = small_tmpfs("8k")  # less than the H.264 of 60 overlay frames
    avi = write_video(tmp_path / "upload.avi", frames(60), fourcc="MJPG")
    with open_segmenter(model) as seg, pytest.raises(SinkError, match=r"upload_segmented\.mp4: cannot write the "
                                                                    r"segmented video: No space left on device"):
        segment_video(avi, seg, ViewSettings(), out_dir=disk)
    assert list(disk.iterdir()) == []  # neither the MP4 nor its .part


def test_a_video_upload_cut_short_under_its_name_is_read_back_and_refused(tmp_path, write_video, model):
    """The .part is replaced mid-run by a truncated copy of itself (what a temp-folder cleaner or
    a second writer leaves): the encoder closes cleanly on the orphaned file, so only reading the
    result back shows that the name holds no playable video."""
    from dilseg.demo.media import segment_video
    from dilseg.runtime.segmenter import open_segmenter
    from dilseg.runtime.sinks import SinkError
    from dilseg.runtime.view import ViewSettings

    avi = write_video(tmp_path / "upload.avi", frames(30), fourcc="MJPG")
    out = tmp_path / "out"
    out.mkdir()
    part = out / ".upload_segmented.mp4.part"
    cut = []

    def cut_short(done: int, _known: int) -> None:
        if not cut and done >= 10 and part.is_file():
            truncated = out / "truncated"
            truncated.write_bytes(part.read_bytes()[:16])
            os.replace(truncated, part)
            cut.append(done)

    with open_segmenter(model) as seg, pytest.raises(SinkError, match=r"upload_segmented\.mp4: cannot write the "
                                                                    r"segmented video: 30 frames were written but "
                                                                    r"the file cannot be opened"):
        segment_video(avi, seg, ViewSettings(), progress=cut_short, out_dir=out)
    assert cut, "the .part never appeared while frames were written"
    assert list(out.iterdir()) == []  # neither the MP4 nor its .part


# ---------------------------------------------------------------------------------- 6. live sources dropped

def _restart_mid_run(server, spec: str, tmp_path: Path, frames_wanted: int) -> None:
    out = tmp_path / "live.mp4"

    def restart(_proc) -> None:
        server.kill()  # vanishes with its connections, as a crashed server does
        time.sleep(0.5)
        server.start()

    code, text, stdout = during_run(tmp_path, ["run", "--source", spec, "--max-frames", frames_wanted, "--output", out,
                                               "--quiet", "--model", tmp_path / "tiny.onnx"], restart)
    assert code == 0, text
    assert "reopened" in text, text
    assert f"out {frames_wanted}," in stdout and "reopens 0" not in stdout, stdout
    assert decoded_frames(out) == frames_wanted


def test_rtsp_server_killed_and_restarted_mid_run(tmp_path, rtsp_server):
    tiny_model(tmp_path / "tiny.onnx")
    server = rtsp_server(width=160, height=120, fps=30)
    _restart_mid_run(server, server.url, tmp_path, 90)


def test_http_mjpeg_server_killed_and_restarted_mid_run(tmp_path, http_server):
    tiny_model(tmp_path / "tiny.onnx")
    server = http_server(tmp_path, fps=30, size=(160, 120))
    _restart_mid_run(server, server.live_url, tmp_path, 90)


# ---------------------------------------------------------------------------------- 10. exit status

def test_a_lost_live_source_exits_3_with_its_frames_kept(tmp_path, http_server, model):
    server = http_server(tmp_path, fps=30, size=(160, 120))
    out = tmp_path / "lost.mp4"
    code, text, _ = during_run(tmp_path, ["run", "--model", model, "--source", server.live_url, "--output", out,
                                          "--quiet", "--reopen-attempts", "2"], lambda _proc: server.kill())
    assert code == 3, text
    assert "source lost" in text and "gave up" in text, text
    assert decoded_frames(out) > 0


def test_several_sources_one_lost_exits_3_and_refuses_an_output_that_is_an_input(tmp_path, http_server, model):
    server = http_server(tmp_path, fps=30, size=(160, 120))
    code, text, _ = during_run(tmp_path, ["run", "--model", model, "--source", server.live_url, "--source",
                                          "test://160x120?frames=30", "--quiet", "--reopen-attempts", "1"],
                               lambda _proc: server.kill())
    assert code == 3, text
    assert "source lost: stream 0" in text
    video = tmp_path / "in0.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    writer.write(frames(1)[0])
    writer.release()
    r = dilseg("run", "--model", model, "--source", video, "--source", "test://", "--output", tmp_path / "in{i}.avi")
    one_line_error(r, "would overwrite the input")
    assert decoded_frames(video) == 1


def test_sigterm_exits_143_with_a_playable_video(tmp_path, model):
    out = tmp_path / "term.mp4"
    code, text, _ = during_run(tmp_path, ["run", "--model", model, "--source", "test://160x120", "--output", out,
                                          "--quiet"], lambda proc: proc.send_signal(signal.SIGTERM))
    assert code == 143, text
    assert decoded_frames(out) > 0


def test_run_help_documents_the_exit_status():
    r = dilseg("run", "--help")
    for code in ("0 ", "2 ", "3 ", "130 ", "143 "):
        assert f"\n  {code}" in r.stdout, r.stdout


# ---------------------------------------------------------------------------------- 9. lying models, memory

@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    for sub in ("images", "labels"):
        (root / "val" / sub).mkdir(parents=True)
    for i, frame in enumerate(frames(2, H, W)):
        cv2.imwrite(str(root / "val" / "images" / f"f{i}.png"), frame)
        cv2.imwrite(str(root / "val" / "labels" / f"f{i}.png"), (np.arange(H * W).reshape(H, W) % 11).astype(np.uint8))
    return root


def test_eval_and_verify_of_a_model_predicting_ids_beyond_its_classes(tmp_path, model, labelled):
    beyond = tiny_model(tmp_path / "beyond.onnx", channels=40)
    r = dilseg("eval", "--model", beyond, "--data", labelled, "--no-progress")
    one_line_error(r, "beyond.onnx", "class id", "11 classes")
    r = dilseg("verify", model, beyond, "--data", labelled, "--no-progress")
    one_line_error(r, "beyond.onnx", "class id", "11 classes")


def test_metadata_input_size_that_disagrees_with_the_graph(tmp_path):
    liar = tiny_model(tmp_path / "liar.onnx", input_size=(360, 480))
    r = dilseg("run", "--model", liar, "--source", "test://160x120?frames=2", "--quiet")
    one_line_error(r, "liar.onnx", "360x480", "64x96")
    assert "INVALID_ARGUMENT" not in r.stderr


def test_a_huge_image_under_a_memory_limit_is_one_line(tmp_path, model):
    big = tmp_path / "big.jpg"
    image = np.zeros((8000, 8000, 3), np.uint8)
    cv2.circle(image, (4000, 4000), 3000, (0, 255, 0), -1)
    cv2.imwrite(str(big), image)
    del image
    r = dilseg("run", "--model", model, "--source", big, "--overlays", tmp_path / "viz", limit_as=1200 << 20)
    one_line_error(r, "out of memory")


# ---------------------------------------------------------------------------------- 11. messages

def test_refused_ports_and_404s_are_named_at_once(tmp_path, http_server, rtsp_server, model):
    from servers import free_port

    http = http_server(tmp_path)
    rtsp = rtsp_server()
    for spec, words in ((f"rtsp://127.0.0.1:{free_port()}/x", ["refused"]),
                        (f"http://127.0.0.1:{free_port()}/x.mp4", ["refused"]),
                        (http.url("missing.mp4"), ["404"]),
                        (f"rtsp://127.0.0.1:{rtsp.port}/nothing", ["404"])):
        t0 = time.monotonic()
        r = dilseg("run", "--model", model, "--source", spec, "--quiet")
        line = one_line_error(r, *words)
        assert "within 10s" not in line, line
        assert time.monotonic() - t0 < 15, line


def test_a_stream_that_opens_but_sends_no_frame_says_so(tmp_path, http_server, write_video, model):
    corrupt_avi(tmp_path / "allbad.avi", write_video, bad=range(10), n=10)  # it opens; no frame decodes
    server = http_server(tmp_path)
    r = dilseg("run", "--model", model, "--source", server.url("allbad.avi"), "--quiet")
    line = one_line_error(r, "connected, but no frame")
    assert "cannot open" not in line, line


def test_a_tiny_frame_to_mp4_does_not_blame_the_build(tmp_path, model):
    cv2.imwrite(str(tmp_path / "one.png"), np.zeros((1, 1, 3), np.uint8))
    r = dilseg("run", "--model", model, "--source", tmp_path / "one.png", "--output", tmp_path / "one.mp4")
    line = one_line_error(r, "1x1")
    assert "FFMPEG" not in line, line


def test_a_truncated_video_says_it_ended_early(tmp_path, write_video, model):
    mp4 = write_video(tmp_path / "v.avi", frames(60), fourcc="MJPG")
    data = mp4.read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])
    r = dilseg("run", "--model", model, "--source", tmp_path / "cut.avi", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "ended early" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------- GStreamer

def test_the_csi_pipeline_runs_with_videotestsrc_in_place_of_the_camera(tmp_path, sysvenv, model):
    from dilseg.runtime.sources import csi_pipeline

    pipeline = swap_csi_camera(csi_pipeline(0, 160, 120, 30, flip=2))
    r = sysvenv.run(["-c", f"""
from dilseg.runtime.sources import open_source
with open_source({pipeline!r}) as src:
    shots = [src.read() for _ in range(5)]
print(src.live, [f.shape for f in shots], int(abs(shots[0].astype(int) - shots[-1]).sum() > 0))
"""])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "[(120, 160, 3)] * 5".replace(" ", ""), "1"] or \
        r.stdout.strip() == "True " + str([(120, 160, 3)] * 5) + " 1", r.stdout
    out = tmp_path / "csi.mp4"
    r = sysvenv.dilseg("run", "--model", model, "--source", pipeline, "--max-frames", "10", "--output", out,
                       "--quiet")
    assert r.returncode == 0, r.stderr
    assert decoded_frames(out) == 10


def test_csi_and_pipelines_on_an_opencv_without_gstreamer_say_what_to_do(model):
    from dilseg.runtime.sources import has_gstreamer

    if has_gstreamer():
        pytest.skip("this OpenCV has GStreamer; the message is for builds without it")
    for spec in ("csi://0", "videotestsrc ! videoconvert ! appsink"):
        r = dilseg("run", "--model", model, "--source", spec)
        one_line_error(r, "GStreamer", "--system-site-packages")
