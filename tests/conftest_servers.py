"""Fixtures for real servers and system pieces (a pytest plugin, registered in conftest.py).

    def test_reconnect(rtsp_server):
        server = rtsp_server()                      # videotestsrc, 320x240 @ 30 fps
        cap = cv2.VideoCapture(server.url)          # rtsp://127.0.0.1:PORT/x
        server.stop(); server.start()               # or server.restart(), server.kill()

    def test_http(http_server, tmp_path):
        server = http_server(tmp_path, rate=200_000)
        server.url("clip.avi"), server.live_url    # files (404 when missing), endless MJPEG

    def test_triton(tritonserver, repo):
        server = tritonserver(repo)                 # ready: every model loaded
        tritonclient.grpc.InferenceServerClient(server.grpc_url)

    def test_gstreamer(sysvenv):
        r = sysvenv.dilseg("run", "--source", "videotestsrc num-buffers=30 ! videoconvert ! appsink")

    def test_disk_full(small_tmpfs):
        full = small_tmpfs("1m")                    # a Path; unmounted at teardown

    def test_kernels(nvcc, tmp_path):
        compile_cubin(KERNELS, "sm_87", tmp_path, nvcc)

See servers.py for the classes behind them and what each one serves.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from servers import (HttpServer, RtspServer, SystemVenv, TritonServer, find_nvcc, mounted_tmpfs, rtsp_missing,
                     triton_missing, unavailable)


class _Started:
    """A factory fixture's servers: each call builds one with its log in the test's tmp_path and
    starts it; ``close()`` kills them all."""

    def __init__(self, cls, tmp_path: Path, **fixed):
        self.cls, self.tmp_path, self.fixed = cls, tmp_path, fixed
        self.servers: list = []

    def __call__(self, *args, **opts):
        log = self.tmp_path / f"{self.cls.kind}-{len(self.servers)}.log"
        server = self.cls(*args, log_path=log, **self.fixed, **opts)
        self.servers.append(server)
        return server.start()

    def close(self) -> None:
        for server in self.servers:
            server.stop(kill=True)


@pytest.fixture
def rtsp_server(tmp_path):
    """``rtsp_server(**RtspServer options) -> RtspServer``, started; all stopped at teardown."""
    reason = rtsp_missing()
    if reason:
        unavailable(f"no RTSP server: {reason}")
    started = _Started(RtspServer, tmp_path)
    yield started
    started.close()


@pytest.fixture
def http_server(tmp_path):
    """``http_server(root, **HttpServer options) -> HttpServer``, started; all stopped at teardown."""
    started = _Started(HttpServer, tmp_path)
    yield started
    started.close()


@pytest.fixture(scope="session")
def sysvenv() -> SystemVenv:
    """The Debian-python venv (OpenCV with GStreamer, dilseg editable from this checkout)."""
    venv = SystemVenv()
    reason = venv.missing()
    if reason:
        unavailable(reason)
    return venv


@pytest.fixture
def tritonserver(sysvenv, tmp_path):
    """``tritonserver(repo, **TritonServer options) -> TritonServer``, started and ready; all stopped
    (SIGKILL, shared memory removed) at teardown."""
    reason = triton_missing(sysvenv)
    if reason:
        unavailable(reason)
    started = _Started(TritonServer, tmp_path, venv=sysvenv)
    yield started
    started.close()


@pytest.fixture
def small_tmpfs(tmp_path):
    """``small_tmpfs(size="2m") -> Path``: a freshly mounted tmpfs of that size (mount's syntax), for
    disk-full faults; unmounted at teardown. Skips, saying why, where mounting is refused."""
    mounted: list[Path] = []
    with contextlib.ExitStack() as stack:
        def mount(size: str = "2m") -> Path:
            where = tmp_path / f"tmpfs-{len(mounted)}-{size}"
            mounted.append(where)
            try:
                return stack.enter_context(mounted_tmpfs(where, size))
            except PermissionError as exc:
                pytest.skip(f"cannot mount a tmpfs here: {exc}")

        yield mount


@pytest.fixture(scope="session")
def nvcc() -> Path:
    """Path of nvcc (PATH, else /usr/local/cuda/bin); skips where there is none."""
    found = find_nvcc()
    if found is None:
        pytest.skip("no nvcc on PATH or in /usr/local/cuda/bin (the CUDA toolkit is not installed)")
    return found
