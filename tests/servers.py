"""Real servers and system pieces for tests, all bound to 127.0.0.1.

Classes (usable on their own, e.g. in a module-scoped fixture, and as context managers):

- ``RtspServer``   gst-rtsp-server (Debian's python3-gi) serving videotestsrc or a video file as H.264
- ``HttpServer``   Python's http.server serving a folder (404 for missing paths), optional rate
                   limit, and an endless MJPEG stream at ``/live.mjpg``
- ``TritonServer`` the tritonserver binary from the nvidia-pytriton wheel, Python backend, in the
                   Debian-python venv (``SYSVENV``)
- ``SystemVenv``   that venv: Debian's python3.11 with system site packages (OpenCV with GStreamer)
                   and dilseg installed editable from this checkout

Every server runs as a child process in its own session: ``start()`` returns once it serves,
``stop()`` ends it (SIGTERM; ``kill()`` is SIGKILL), ``restart()`` brings it back on the same
port(s), and its output is kept in ``log_path`` (``log_text()`` for assertion messages).

Fixtures (registered by ``tests/conftest_servers.py``): ``rtsp_server``, ``http_server``,
``tritonserver`` (factories: call them, each server is stopped at teardown), ``sysvenv``,
``small_tmpfs`` (factory), ``nvcc``. ``scripts/ci_system.sh`` installs what they need; where a
piece is missing they skip with the reason, and under CI (``CI`` set) they fail instead, so a CI
run cannot pass by skipping what it was meant to install.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SYSTEM_PYTHON = Path("/usr/bin/python3")
SYSVENV = Path(os.environ.get("DILSEG_SYSVENV", REPO / ".sysvenv"))
INSTALLED_BY = "scripts/ci_system.sh installs it (run `bash scripts/ci_system.sh` as root)"


# -- small utilities ------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def unavailable(reason: str) -> None:
    """Skip the test, naming what is missing; under CI fail, since CI installs these pieces."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"{reason} ({INSTALLED_BY}; CI must not skip this)", pytrace=False)
    pytest.skip(reason)


def _child_env(extra: dict | None = None, path_first: Path | None = None) -> dict:
    """The environment for a child running another Python: none of this interpreter's overrides."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV")}
    if path_first is not None:
        env["PATH"] = f"{path_first}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


# -- child-process servers ------------------------------------------------------------------

class ServerProcess(abc.ABC):
    """A server run as a child process (see the module docstring)."""

    kind = "server"
    start_timeout = 20.0

    def __init__(self, log_path: str | Path | None = None):
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix=f"dilseg-{self.kind}-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    # subclasses: what to run, and when it counts as serving
    @abc.abstractmethod
    def command(self) -> list[str]:
        """The child's argv."""

    def env(self) -> dict:
        return _child_env()

    def ready(self) -> bool:
        return "READY" in self.log_text()

    def start(self, timeout: float | None = None) -> "ServerProcess":
        if self.running:
            return self
        log = open(self.log_path, "ab")
        log.write(f"--- start {self.starts + 1}: {' '.join(self.command())}\n".encode())
        log.flush()
        self._log_offset = log.tell()
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env(), start_new_session=True)
        log.close()
        self.starts += 1
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode} before serving:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.05)
        self.stop(kill=True)
        raise RuntimeError(f"{self.kind} did not become ready within {timeout or self.start_timeout:.0f}s:\n"
                           f"{self.log_tail()}")

    def stop(self, kill: bool = False, timeout: float = 15.0) -> int | None:
        """End the server (SIGTERM, or SIGKILL with ``kill=True``) and wait; returns its exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if kill:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Children it left behind (tritonserver's backend stubs) go with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.cleanup()
        return proc.returncode

    def kill(self) -> int | None:
        """SIGKILL: the server vanishes with its connections, as a crashed one does."""
        return self.stop(kill=True)

    def restart(self, timeout: float | None = None) -> "ServerProcess":
        """Stop and start again on the same port(s)."""
        self.stop()
        return self.start(timeout)

    def cleanup(self) -> None:
        """What to remove after the process is gone."""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log_text(self) -> str:
        """Output of the current (or last) run."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(getattr(self, "_log_offset", 0))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RtspServer(ServerProcess):
    """gst-rtsp-server on 127.0.0.1 serving ``rtsp://127.0.0.1:PORT/MOUNT`` as H.264 (x264enc).

    ``file``: a video file, played once (the stream then ends); default: a live videotestsrc of
    ``width``x``height`` at ``fps`` (a moving ball, so consecutive frames differ). ``launch``: a
    full gst-rtsp-server launch line instead. RTP goes over the RTSP TCP connection unless
    ``udp=True`` (RTP/UDP ports then come from 127.0.0.1 as well). One shared pipeline serves every
    client, as a camera does. Runs under Debian's /usr/bin/python3 (PyGObject)."""

    kind = "rtsp-server"

    def __init__(self, port: int | None = None, mount: str = "x", file: str | Path | None = None,
                 launch: str | None = None, width: int = 320, height: int = 240, fps: int = 30,
                 udp: bool = False, log_path: str | Path | None = None):
        super().__init__(log_path)
        self.port = port or free_port()
        self.mount = mount.strip("/")
        self.file, self.launch, self.udp = file, launch, udp
        self.width, self.height, self.fps = width, height, fps

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/{self.mount}"

    def command(self) -> list[str]:
        cmd = [str(SYSTEM_PYTHON), str(HERE / "rtsp_server.py"), "--port", str(self.port), "--mount", self.mount,
               "--width", str(self.width), "--height", str(self.height), "--fps", str(self.fps)]
        if self.file:
            cmd += ["--file", str(self.file)]
        if self.launch:
            cmd += ["--launch", self.launch]
        if self.udp:
            cmd.append("--udp")
        return cmd


@functools.lru_cache(maxsize=None)
def rtsp_missing() -> str | None:
    """Why an RtspServer cannot run here, or None."""
    if not SYSTEM_PYTHON.exists():
        return f"no {SYSTEM_PYTHON} (Debian's python3 with python3-gi)"
    r = subprocess.run([str(SYSTEM_PYTHON), str(HERE / "rtsp_server.py"), "--check"], capture_output=True,
                       text=True, env=_child_env(), timeout=60)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["rtsp_server.py --check failed"])[-1]


class HttpServer(ServerProcess):
    """Python's http.server on 127.0.0.1 serving ``root`` (404 for missing paths), each file response
    limited to ``rate`` bytes/s if given, and an endless MJPEG stream at ``live_url``."""

    kind = "http-server"

    def __init__(self, root: str | Path, port: int | None = None, rate: float = 0.0, fps: float = 15.0,
                 size: tuple[int, int] = (320, 240), log_path: str | Path | None = None):
        super().__init__(log_path)
        self.root = Path(root)
        self.port = port or free_port()
        self.rate, self.fps, self.size = rate, fps, size

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{str(path).lstrip('/')}"

    @property
    def live_url(self) -> str:
        return self.url("live.mjpg")

    def command(self) -> list[str]:
        return [sys.executable, str(HERE / "http_server.py"), "--port", str(self.port), "--root", str(self.root),
                "--rate", str(self.rate), "--fps", str(self.fps), "--size", f"{self.size[0]}x{self.size[1]}"]


# -- the Debian-python venv and tritonserver ----------------------------------------------

class SystemVenv:
    """Debian's python3.11 venv with system site packages: Debian's OpenCV (built with GStreamer) and
    numpy, plus onnxruntime, tqdm, nvidia-pytriton and dilseg (editable, this checkout)."""

    def __init__(self, path: str | Path = SYSVENV):
        self.path = Path(path)
        self.python = self.path / "bin" / "python"

    def missing(self) -> str | None:
        """Why the venv cannot run dilseg with GStreamer here, or None."""
        if not self.python.exists():
            return f"no Debian-python venv at {self.path}"
        if self.stale():
            return (f"the venv at {self.path} was built for another pyproject.toml or ci_system.sh "
                    "(entry points and package folders come from its install): run `bash scripts/ci_system.sh`")
        r = self.run(["-c", "import cv2, onnxruntime, dilseg.runtime.sources as s; "
                            "assert s.has_gstreamer(), 'OpenCV without GStreamer'"], timeout=60)
        return None if r.returncode == 0 else f"the venv at {self.path} is incomplete: {r.stderr.strip()[-300:]}"

    def stale(self) -> bool:
        """Whether scripts/ci_system.sh would rebuild the venv (its stamp, as that script writes it)."""
        digest = hashlib.sha256((REPO / "scripts" / "ci_system.sh").read_bytes() + (REPO / "pyproject.toml").read_bytes())
        stamp = self.path / ".dilseg-ci-system"
        return not stamp.exists() or stamp.read_text().strip() != f"{digest.hexdigest()[:16]} {REPO}"

    def env(self, extra: dict | None = None) -> dict:
        return _child_env(extra, path_first=self.path / "bin")

    def run(self, args: Sequence[str], timeout: float = 120, env: dict | None = None,
            cwd: str | Path | None = None, **kw) -> subprocess.CompletedProcess:
        """``python ARGS`` in the venv; text output captured."""
        return subprocess.run([str(self.python), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                              env=self.env(env), cwd=cwd, stdin=subprocess.DEVNULL, **kw)

    def dilseg(self, *args: str | Path, timeout: float = 120, env: dict | None = None,
               cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """``dilseg ARGS`` with the venv's OpenCV (GStreamer); text output captured."""
        return subprocess.run([str(self.path / "bin" / "dilseg"), *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env=self.env(env), cwd=cwd, stdin=subprocess.DEVNULL)


def tritonserver_dir(venv: SystemVenv | None = None) -> Path:
    """``pytriton/tritonserver`` inside the venv: bin/tritonserver, backends/python, caches/."""
    venv = venv or SystemVenv()
    found = sorted(venv.path.glob("lib/python3*/site-packages/pytriton/tritonserver"))
    return found[0] if found else venv.path / "lib/python3.11/site-packages/pytriton/tritonserver"


def triton_missing(venv: SystemVenv | None = None) -> str | None:
    root = tritonserver_dir(venv)
    for need in ("bin/tritonserver", "backends/python/libtriton_python.so", "backends/python/triton_python_backend_stub"):
        if not (root / need).exists():
            return f"no {root / need} (nvidia-pytriton in the Debian-python venv, stub copied beside the backend)"
    return None


def can_unshare_mounts() -> str | None:
    """None when this process may start a program in a mount namespace of its own, else why not."""
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed (util-linux)"
    r = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"], capture_output=True,
                       text=True, timeout=30)
    return None if r.returncode == 0 else f"cannot make a mount namespace here: {r.stderr.strip() or r.returncode}"


class TritonServer(ServerProcess):
    """tritonserver on 127.0.0.1 (HTTP, gRPC and metrics ports free unless given) serving ``repo``.

    ``start()`` returns when ``/v2/health/ready`` answers 200: every model in the repository is
    loaded (pass ``args=["--strict-readiness=false"]`` or a model-control mode to change that).
    The Python backend's stub runs the venv's python, so a model.py imports what the venv has:
    Debian's numpy and OpenCV, onnxruntime and dilseg. ``args`` are added to the command line."""

    kind = "tritonserver"
    start_timeout = 90.0

    def __init__(self, repo: str | Path, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, args: Sequence[str] = (), venv: SystemVenv | None = None,
                 env: dict | None = None, log_path: str | Path | None = None, private_shm: bool = False):
        super().__init__(log_path)
        self.repo = Path(repo)
        # private_shm: the server gets a /dev/shm of its own (a mount namespace with a fresh
        # tmpfs), as a tritonserver in a container without --ipc=host has: it cannot map a
        # client's shared-memory regions. Needs root and unshare(1) (``can_unshare_mounts``).
        self.private_shm = private_shm
        self.venv = venv or SystemVenv()
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.args = list(args)
        self.extra_env = env or {}
        # The Python backend's shared-memory files in /dev/shm carry this prefix, so what a killed
        # server leaves there can be removed.
        self.shm_prefix = f"dilseg_test_{os.getpid()}_{self.http_port}_"

    @property
    def http_url(self) -> str:
        """For tritonclient.http: ``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """For tritonclient.grpc: ``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        root = tritonserver_dir(self.venv)
        # exec all the way down: the process started is tritonserver itself (signals, kill).
        wrap = (["unshare", "--mount", "sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "sh"]
                if self.private_shm else [])
        return [*wrap, str(root / "bin" / "tritonserver"), f"--model-repository={self.repo}",
                f"--backend-directory={root / 'backends'}", f"--cache-directory={root / 'caches'}",
                "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
                "--allow-gpu-metrics=false", "--exit-timeout-secs=5",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}", *self.args]

    def env(self) -> dict:
        # The stub finds its Python through PATH: the venv's python3 first.
        return self.venv.env(self.extra_env)

    def ready(self) -> bool:
        return self._get("/v2/health/ready") == 200

    def model_ready(self, name: str, version: str = "") -> bool:
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/ready"
        return self._get(path) == 200

    def _get(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def cleanup(self) -> None:
        for leftover in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            with contextlib.suppress(OSError):
                leftover.unlink()


# -- GStreamer pipelines ------------------------------------------------------------------

# nvvidconv's flip-method numbers, as videoflip's method names (the two enums are ordered differently).
_NVVIDCONV_FLIP = {0: "none", 1: "counterclockwise", 2: "rotate-180", 3: "clockwise", 4: "horizontal-flip",
                   5: "upper-right-diagonal", 6: "vertical-flip", 7: "upper-left-diagonal"}


def swap_csi_camera(pipeline: str, source: str = "videotestsrc is-live=true pattern=ball") -> str:
    """A Jetson CSI pipeline with its NVIDIA elements replaced by stock GStreamer ones, the rest kept
    as written: ``nvarguscamerasrc ... ! video/x-raw(memory:NVMM), ...`` becomes ``SOURCE !
    video/x-raw, ...`` and ``nvvidconv flip-method=N`` becomes ``videoflip method=... ! videoconvert``."""
    out, n = re.subn(r"nvarguscamerasrc\b[^!]*!\s*video/x-raw\(memory:NVMM\)", f"{source} ! video/x-raw", pipeline)
    if n != 1:
        raise ValueError(f"no `nvarguscamerasrc ... ! video/x-raw(memory:NVMM)` in {pipeline!r}")

    def flip(m: re.Match) -> str:
        return f"videoflip method={_NVVIDCONV_FLIP[int(m.group(1) or 0)]} ! videoconvert"

    out, n = re.subn(r"nvvidconv(?:\s+flip-method=(\d+))?", flip, out)
    if n != 1:
        raise ValueError(f"no nvvidconv element in {pipeline!r}")
    return out


# -- tmpfs and nvcc -----------------------------------------------------------------------

@contextlib.contextmanager
def mounted_tmpfs(where: str | Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's syntax: 2m, 512k) mounted at ``where`` for the block. Raises
    PermissionError saying why where mounting is refused (not root, no CAP_SYS_ADMIN)."""
    where = Path(where)
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        raise PermissionError("no mount command")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise PermissionError(f"mount -t tmpfs refused: {(r.stderr or r.stdout).strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            # Still held open (a child that has not exited yet): detach now, freed when released.
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def find_nvcc() -> Path | None:
    found = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.access(p, os.X_OK)), None)
    return Path(found) if found else None


def compile_cubin(source: str, arch: str, workdir: str | Path, nvcc: str | Path | None = None,
                  no_extern_c: bool = True, options: Sequence[str] = ()) -> Path:
    """Compile CUDA source to a cubin the way pycuda's SourceModule does: ``kernel.cu`` in a work
    folder, ``nvcc --cubin -arch ARCH [PYCUDA_DEFAULT_NVCC_FLAGS] [options] kernel.cu`` run there,
    the source wrapped in ``extern "C" {}`` unless ``no_extern_c``. Raises AssertionError with
    nvcc's output when it fails."""
    nvcc = Path(nvcc) if nvcc else find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found on PATH or in /usr/local/cuda/bin")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "kernel.cu").write_text(source if no_extern_c else f'extern "C" {{\n{source}\n}}\n')
    flags = os.environ.get("PYCUDA_DEFAULT_NVCC_FLAGS", "").split()
    cmd = [str(nvcc), "--cubin", "-arch", arch, *flags, *options, "kernel.cu"]
    r = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}"
    return workdir / "kernel.cubin"
