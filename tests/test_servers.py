"""The test servers and system pieces really work: a real client reads a real stream or response
from each, including across a stop and a restart on the same port."""

from __future__ import annotations

import errno
import json
import os
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from servers import REPO, compile_cubin, port_open, swap_csi_camera

TIMEOUT_MS = 5000


def open_stream(url: str) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG,
                           [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, TIMEOUT_MS])
    assert cap.isOpened(), f"OpenCV cannot open {url}"
    return cap


def read_frames(cap: cv2.VideoCapture, n: int) -> list[np.ndarray]:
    frames = []
    for _ in range(n):
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    return frames


def test_rtsp_server_streams_to_opencv_and_restarts_on_the_same_port(rtsp_server):
    server = rtsp_server(width=160, height=120, fps=30)
    cap = open_stream(server.url)
    frames = read_frames(cap, 10)
    assert len(frames) == 10 and frames[0].shape == (120, 160, 3)
    assert any(np.abs(f.astype(int) - frames[0]).sum() for f in frames[1:]), "the test pattern does not move"

    port = server.port
    server.kill()
    assert not port_open(port)
    t0 = time.monotonic()
    buffered = read_frames(cap, 60)  # what the client had already received, then the failure
    assert len(buffered) < 60 and time.monotonic() - t0 < TIMEOUT_MS / 1000 + 2, "reads went on after the server died"
    cap.release()

    server.start()
    assert server.port == port and server.starts == 2
    cap = open_stream(server.url)
    assert len(read_frames(cap, 5)) == 5
    cap.release()


def test_rtsp_server_serves_a_video_file_once(rtsp_server, write_video, tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (96, 128, 3), np.uint8) for _ in range(15)]
    video = write_video(tmp_path / "clip.mp4", frames, fps=15.0)
    server = rtsp_server(file=video, fps=15)
    cap = open_stream(server.url)
    got = read_frames(cap, 100)
    cap.release()
    # The file plays once and the stream ends: not an endless stream, not an empty one.
    assert 10 <= len(got) <= 15, len(got)
    assert got[0].shape == (96, 128, 3)


def test_rtsp_server_refuses_a_bad_launch_line(rtsp_server):
    with pytest.raises(RuntimeError, match="nosuchelement"):
        rtsp_server(launch="( videotestsrc ! nosuchelement ! rtph264pay name=pay0 )")


def test_http_server_serves_a_video_and_404s(http_server, write_video, tmp_path):
    frames = [np.full((64, 80, 3), 10 * i, np.uint8) for i in range(12)]
    write_video(tmp_path / "clip.avi", frames, fps=10.0, fourcc="MJPG")
    server = http_server(tmp_path)
    cap = open_stream(server.url("clip.avi"))
    got = read_frames(cap, 100)
    cap.release()
    assert len(got) == 12 and got[0].shape == (64, 80, 3)
    assert abs(float(got[5].mean()) - 50) < 3

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.url("missing.avi"), timeout=5)
    assert err.value.code == 404


def test_http_server_rate_limit_holds_a_transfer_open(http_server, tmp_path):
    (tmp_path / "blob.bin").write_bytes(os.urandom(60_000))
    server = http_server(tmp_path, rate=100_000)
    t0 = time.monotonic()
    with urllib.request.urlopen(server.url("blob.bin"), timeout=10) as r:
        body = r.read()
    assert len(body) == 60_000
    assert time.monotonic() - t0 >= 0.5  # 60 kB at 100 kB/s: a transfer a test can interrupt


def test_http_server_live_mjpeg_drops_and_comes_back(http_server, tmp_path):
    server = http_server(tmp_path, fps=20, size=(96, 64))
    cap = open_stream(server.live_url)
    frames = read_frames(cap, 6)
    assert len(frames) == 6 and frames[0].shape == (64, 96, 3)
    assert np.abs(frames[5].astype(int) - frames[0]).sum() > 0

    server.kill()
    t0 = time.monotonic()
    assert len(read_frames(cap, 100)) < 100, "frames kept coming after the server was killed"
    assert time.monotonic() - t0 < TIMEOUT_MS / 1000 + 2
    cap.release()
    server.start()
    cap = open_stream(server.live_url)
    assert len(read_frames(cap, 3)) == 3
    cap.release()


def test_sysvenv_opencv_reads_a_gstreamer_pipeline(sysvenv):
    code = textwrap.dedent("""
        import cv2
        cap = cv2.VideoCapture("videotestsrc num-buffers=30 ! video/x-raw,width=320,height=240 ! videoconvert "
                               "! appsink", cv2.CAP_GSTREAMER)
        n = 0
        while cap.read()[0]:
            n += 1
        print(n)
    """)
    r = sysvenv.run(["-c", code], timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "30"


def test_swap_csi_camera_keeps_the_pipeline_and_maps_flip():
    from dilseg.runtime.sources import csi_pipeline

    swapped = swap_csi_camera(csi_pipeline(1, 160, 120, 30, flip=2))
    assert "nvarguscamerasrc" not in swapped and "NVMM" not in swapped and "nvvidconv" not in swapped
    assert swapped.startswith("videotestsrc is-live=true pattern=ball ! video/x-raw, width=(int)160")
    assert "videoflip method=rotate-180 ! videoconvert" in swapped
    assert swapped.endswith(csi_pipeline(1, 160, 120, 30).split("nvvidconv flip-method=0", 1)[1])
    with pytest.raises(ValueError, match="nvarguscamerasrc"):
        swap_csi_camera("videotestsrc ! appsink")


def test_sysvenv_runs_dilseg_on_the_csi_pipeline_with_a_test_camera(sysvenv, tmp_path):
    from dilseg.runtime.sources import csi_pipeline

    pipeline = swap_csi_camera(csi_pipeline(0, 160, 120, 30))
    r = sysvenv.dilseg("run", "--source", pipeline, "--max-frames", "4", "--labels", tmp_path / "labels", "--quiet",
                       timeout=120)
    assert r.returncode == 0, r.stderr
    labels = sorted((tmp_path / "labels").glob("*.png"))
    assert len(labels) == 4
    assert cv2.imread(str(labels[0]), cv2.IMREAD_UNCHANGED).shape == (120, 160)


PROBE_MODEL = '''
import json, sys
import numpy as np
import triton_python_backend_utils as pb_utils


def describe():
    import cv2, dilseg, onnxruntime
    gst = [l for l in cv2.getBuildInformation().splitlines() if l.strip().startswith("GStreamer:")]
    return {"executable": sys.executable, "version": sys.version.split()[0], "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__, "cv2": cv2.__version__, "gstreamer": gst[0].split(":", 1)[1].strip(),
            "dilseg": dilseg.__file__}


class TritonPythonModel:
    def initialize(self, args):
        self.info = json.dumps(describe())

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            info = np.array([[self.info.encode()]] * len(x), dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", (x * 2 + 1).astype(np.float32)),
                                                         pb_utils.Tensor("info", info)]))
        return responses
'''

PROBE_CONFIG = '''
name: "probe"
backend: "python"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "info" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
'''


@pytest.fixture
def probe_repo(tmp_path):
    (tmp_path / "repo" / "probe" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "probe" / "config.pbtxt").write_text(PROBE_CONFIG)
    (tmp_path / "repo" / "probe" / "1" / "model.py").write_text(PROBE_MODEL)
    return tmp_path / "repo"


def infer(module, url: str, x: np.ndarray, outputs=("y",)):
    client = module.InferenceServerClient(url)
    inp = module.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("probe", [inp], outputs=[module.InferRequestedOutput(o) for o in outputs])


def test_tritonserver_python_backend_over_grpc_http_and_shared_memory(tritonserver, probe_repo):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    import tritonclient.utils.shared_memory as shm

    server = tritonserver(probe_repo)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for module, url in ((grpcclient, server.grpc_url), (httpclient, server.http_url)):
        result = infer(module, url, x, ("y", "info"))
        np.testing.assert_array_equal(result.as_numpy("y"), x * 2 + 1)

    # What model.py sees: the venv's Debian python with its OpenCV, onnxruntime and this checkout's dilseg.
    info = json.loads(result.as_numpy("info")[0, 0])
    assert info["executable"].startswith(str(server.venv.path)), info
    assert info["gstreamer"].startswith("YES"), info
    assert info["dilseg"].startswith(str(REPO)), info

    # System shared memory from a local client: inputs and outputs never cross the socket.
    client = grpcclient.InferenceServerClient(server.grpc_url)
    key = f"/dilseg_selftest_{os.getpid()}"
    regions = [shm.create_shared_memory_region(f"{name}_{os.getpid()}", f"{key}_{name}", x.nbytes) for name in ("in", "out")]
    try:
        shm.set_shared_memory_region(regions[0], [x])
        for name in ("in", "out"):
            client.register_system_shared_memory(f"{name}_{os.getpid()}", f"{key}_{name}", x.nbytes)
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_shared_memory(f"in_{os.getpid()}", x.nbytes)
        out = grpcclient.InferRequestedOutput("y")
        out.set_shared_memory(f"out_{os.getpid()}", x.nbytes)
        client.infer("probe", [inp], outputs=[out])
        np.testing.assert_array_equal(shm.get_contents_as_numpy(regions[1], np.float32, [2, 4]), x * 2 + 1)
    finally:
        client.unregister_system_shared_memory()
        for region in regions:
            shm.destroy_shared_memory_region(region)


def test_tritonserver_restarts_on_the_same_ports(tritonserver, probe_repo):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    server = tritonserver(probe_repo)
    x = np.ones((1, 4), np.float32)
    assert infer(grpcclient, server.grpc_url, x).as_numpy("y").tolist() == [[3.0] * 4]
    ports = (server.http_port, server.grpc_port)
    server.kill()
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))
    with pytest.raises(InferenceServerException):
        infer(grpcclient, server.grpc_url, x)
    server.start()
    assert (server.http_port, server.grpc_port) == ports and server.model_ready("probe")
    assert infer(grpcclient, server.grpc_url, x).as_numpy("y").tolist() == [[3.0] * 4]


def test_small_tmpfs_fills_up(small_tmpfs):
    where = small_tmpfs("1m")
    assert os.path.ismount(where)
    with pytest.raises(OSError) as err:
        with open(where / "big.bin", "wb") as f:
            for _ in range(4):
                f.write(b"\0" * 512 * 1024)
                f.flush()
                os.fsync(f.fileno())
    assert err.value.errno == errno.ENOSPC


KERNEL = r'''
#include <cuda_fp16.h>
extern "C" __global__ void scale_to_half(const float* src, __half* dst, float k, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __float2half(src[i] * k);
}
'''


@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
def test_nvcc_compiles_a_cubin_as_pycuda_does(nvcc, tmp_path, arch):
    cubin = compile_cubin(KERNEL, arch, tmp_path, nvcc)
    data = cubin.read_bytes()
    assert data[:4] == b"\x7fELF"
    assert b"scale_to_half" in data
    # A cubin's ELF e_flags carry the SM it was built for in bits 8-15 (0x57 = 87).
    assert (int.from_bytes(data[48:52], "little") >> 8) & 0xFF == int(arch[3:])
    with pytest.raises(AssertionError, match="error"):
        compile_cubin("__global__ void broken( {", arch, tmp_path / "broken", nvcc)
