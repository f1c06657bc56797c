"""`dilseg export triton` and the Triton client backend, against a real tritonserver on 127.0.0.1.

The repository tests parse every written config.pbtxt with protobuf's text_format into Triton's
own ModelConfig (tritonclient.grpc.model_config_pb2). The client tests share one server per
module (tritonserver 2.51 from nvidia-pytriton, Python backend, in the Debian-python venv) that
serves the shipped model through the Python-backend repository `dilseg export triton` writes,
plus copies of it whose config parameters disagree with the model, and one left unloaded.
TensorRT plans cannot be built here (no GPU): their config and build script are checked, and the
.engine path is fed an engine's sidecar as `dilseg build` writes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from dilseg.runtime.artifact import read_meta
from dilseg.runtime.backends import open_backend
from dilseg.runtime.backends.triton_backend import (TritonBackend, TritonMismatch, TritonModelError, TritonTimeout,
                                                    TritonUnavailable)
from dilseg.runtime.cli import main
from dilseg.runtime.defaults import default_model_path
from dilseg.runtime.metadata import METADATA_KEY, ModelMeta
from dilseg.runtime.segmenter import Segmenter
from precision_helpers import CAMVID, needs_camvid
from servers import REPO, TritonServer, free_port, triton_missing, unavailable

try:
    from test_demo_app import downloads  # noqa: F401  (reads what the page's download buttons serve)
except pytest.skip.Exception:  # test_demo_app skips itself without streamlit
    @pytest.fixture
    def downloads():
        pytest.skip("the demo needs streamlit and streamlit-webrtc (pip install 'dilseg[demo]')")

MODEL = default_model_path()
NAME = "edge_m"


def parse_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def export(*args: str) -> int:
    return main(["export", "triton", *map(str, args)])


def val_frames(n: int) -> list[np.ndarray]:
    paths = sorted((CAMVID / "val" / "images").glob("*.png"))[:n] or sorted((CAMVID / "val" / "images").iterdir())[:n]
    return [cv2.imread(str(p)) for p in paths]


# -- the repository writer (no server) ---------------------------------------------------------

def test_onnxruntime_platform_config_follows_tritons_schema_and_carries_the_metadata(tmp_path, capsys):
    assert export(MODEL, "-o", tmp_path / "repo", "--max-batch-size", "4", "--queue-delay-us", "500",
                  "--instances", "2", "--threads", "1") == 0
    assert "dynamic batching up to 4" in capsys.readouterr().out
    folder = tmp_path / "repo" / NAME
    cfg = parse_config(folder / "config.pbtxt")
    assert cfg.name == NAME and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 4
    assert [(i.name, mc.DataType.Name(i.data_type), list(i.dims)) for i in cfg.input] == \
        [("input", "TYPE_FP32", [3, 360, 480])]
    assert [(o.name, mc.DataType.Name(o.data_type), list(o.dims)) for o in cfg.output] == \
        [("labels", "TYPE_INT32", [360, 480])]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU and cfg.instance_group[0].count == 2
    assert cfg.parameters["intra_op_thread_count"].string_value == "1"
    assert cfg.parameters["dilseg_input"].string_value == "tensor"
    assert ModelMeta.from_json(cfg.parameters[METADATA_KEY].string_value) == read_meta(MODEL)
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == ["config.pbtxt", "model.onnx"]


@needs_camvid
def test_served_onnx_has_a_free_batch_axis_and_batches_real_frames_as_single_runs(tmp_path):
    import onnxruntime as ort

    from dilseg.runtime.preprocess import preprocess

    export(MODEL, "-o", tmp_path / "repo")
    served = ort.InferenceSession(str(tmp_path / "repo" / NAME / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert isinstance(served.get_inputs()[0].shape[0], str)
    meta = read_meta(MODEL)
    batch = np.concatenate([preprocess(f, meta) for f in val_frames(3)])
    together = served.run(None, {"input": batch})[0]
    with open_backend(MODEL, "onnxruntime") as alone:
        for i in range(3):
            assert (together[i] == alone.infer(batch[i:i + 1])[0]).mean() >= 0.999


def test_python_platform_takes_frames_and_ships_model_py(tmp_path):
    assert export(MODEL, "-o", tmp_path / "repo", "--platform", "python", "--name", "cam") == 0
    folder = tmp_path / "repo" / "cam"
    cfg = parse_config(folder / "config.pbtxt")
    assert cfg.backend == "python" and not cfg.platform and cfg.name == "cam"
    assert [(i.name, mc.DataType.Name(i.data_type), list(i.dims)) for i in cfg.input] == \
        [("FRAME", "TYPE_UINT8", [-1, -1, 3])]
    assert [(o.name, mc.DataType.Name(o.data_type), list(o.dims)) for o in cfg.output] == \
        [("labels", "TYPE_UINT8", [360, 480])]  # 11 classes fit a byte
    assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds == 0
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert cfg.parameters["dilseg_input"].string_value == "frame"
    assert (folder / "1" / "model.py").read_text() == (REPO / "export" / "triton_python_model.py").read_text()
    assert (folder / "1" / "model.onnx").is_file()


def test_a_dynamic_size_model_gets_dynamic_dims(small_onnx_dynamic, tmp_path):
    for platform, want_in, want_out in (("onnxruntime_onnx", [3, -1, -1], [-1, -1]),
                                        ("python", [-1, -1, 3], [-1, -1])):
        assert export(small_onnx_dynamic, "-o", tmp_path / platform, "--platform", platform, "--name", "m") == 0
        cfg = parse_config(tmp_path / platform / "m" / "config.pbtxt")
        assert list(cfg.input[0].dims) == want_in and list(cfg.output[0].dims) == want_out, platform
        assert json.loads(cfg.parameters[METADATA_KEY].string_value)["input_size"] is None


def test_tensorrt_plan_from_onnx_writes_the_config_and_a_build_script(tmp_path):
    assert export(MODEL, "-o", tmp_path / "repo", "--platform", "tensorrt_plan") == 0
    folder = tmp_path / "repo" / NAME
    cfg = parse_config(folder / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan" and cfg.max_batch_size == 8
    script = (folder / "build_plan.sh").read_text()
    assert os.access(folder / "build_plan.sh", os.X_OK)
    assert subprocess.run(["bash", "-n", str(folder / "build_plan.sh")]).returncode == 0
    assert "--minShapes=input:1x3x360x480" in script and "--maxShapes=input:8x3x360x480" in script
    assert 'saveEngine="$here/1/model.plan.part"' in script
    assert (folder / "model.onnx").is_file() and not (folder / "1").exists()  # the plan is built on the GPU


def test_tensorrt_plan_from_an_engine_reads_its_sidecar(tmp_path):
    from dilseg.runtime.trt.cache import make_sidecar

    meta = read_meta(MODEL)
    engine = tmp_path / "edge_m.engine"
    engine.write_bytes(b"engine bytes as dilseg build writes them")
    io = [{"name": "input", "mode": "input", "dtype": "float", "shape": [-1, 3, 360, 480]},
          {"name": "labels", "mode": "output", "dtype": "int32", "shape": [-1, 360, 480]}]
    side = make_sidecar(meta, tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7", precision="fp16",
                        profile={"input": "input", "min": [1, 3, 360, 480], "opt": [2, 3, 360, 480],
                                 "max": [4, 3, 360, 480]}, onnx_sha256="0", engine_sha256="0", engine_size=40, io=io)
    (tmp_path / "edge_m.engine.json").write_text(json.dumps(side))
    assert main(["export", "triton", str(engine), "-o", str(tmp_path / "repo"), "--platform", "tensorrt_plan"]) == 2
    assert not (tmp_path / "repo" / NAME).exists()  # batch 8 > the profile's 4: refused, nothing written
    assert export(engine, "-o", tmp_path / "repo", "--platform", "tensorrt_plan", "--max-batch-size", "4") == 0
    cfg = parse_config(tmp_path / "repo" / NAME / "config.pbtxt")
    assert [list(i.dims) for i in cfg.input] == [[3, 360, 480]] and cfg.max_batch_size == 4
    assert (tmp_path / "repo" / NAME / "1" / "model.plan").read_bytes() == engine.read_bytes()


def test_bad_requests_are_one_line_errors_and_leave_the_repository_as_it_was(tmp_path, capsys):
    repo = tmp_path / "repo"
    assert export(MODEL, "-o", repo) == 0
    before = (repo / NAME / "config.pbtxt").read_text()
    capsys.readouterr()
    cases = [
        ([MODEL, "-o", repo], "already exists; pass --overwrite"),
        ([MODEL, "-o", repo, "--name", "b", "--preferred-batch-size", "16"], "must be within 1..--max-batch-size"),
        ([MODEL, "-o", repo, "--name", "b", "--max-batch-size", "-1"], "must be a whole number >= 0"),
        ([tmp_path / "missing.onnx", "-o", repo], "no such file"),
        ([repo / NAME / "config.pbtxt", "-o", repo, "--name", "b"], "not a dilseg .onnx"),
    ]
    for args, message in cases:
        assert export(*args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in repo.iterdir()) == [NAME]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    assert export(MODEL, "-o", repo, "--overwrite", "--max-batch-size", "2") == 0
    assert (repo / NAME / "config.pbtxt").read_text() != before
    assert parse_config(repo / NAME / "config.pbtxt").max_batch_size == 2


def test_export_triton_needs_no_torch(tmp_path):
    from test_no_torch import BLOCK_TORCH, python

    r = python(BLOCK_TORCH + f"""
import sys
from dilseg.runtime.cli import main
assert main(["export", "triton", {str(MODEL)!r}, "-o", {str(tmp_path / "repo")!r}, "--platform", "python"]) == 0
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
""")
    assert r.returncode == 0, r.stderr
    assert "LOADED []" in r.stdout and (tmp_path / "repo" / NAME / "1" / "model.py").is_file()


def test_check_config_refuses_what_triton_would(tmp_path):
    from dilseg.export.triton_repo import TritonRepoError, check_config

    export(MODEL, "-o", tmp_path / "repo")
    good = (tmp_path / "repo" / NAME / "config.pbtxt").read_text()
    assert check_config(good, folder_name=NAME).max_batch_size == 8
    bad = {
        "max_batch_size: 8\nnot_a_field: 1\n" + good: "not a valid Triton model config",
        good.replace("max_batch_size: 8", "max_batch_size: 0"): "dynamic_batching needs max_batch_size > 0",
        good.replace("preferred_batch_size: 8", "preferred_batch_size: 9"): "preferred_batch_size 9",
        good.replace('key: "dilseg"', 'key: "other"'): "parameters lack 'dilseg'",
        good.replace("dims: 360", "dims: 0", 1): "dims",
    }
    for text, message in bad.items():
        with pytest.raises(TritonRepoError, match=message):
            check_config(text, "x/config.pbtxt", folder_name=NAME)
    with pytest.raises(TritonRepoError, match="differs from its folder"):
        check_config(good, folder_name="other")


# -- a real tritonserver --------------------------------------------------------------------------

def tamper(repo: Path, name: str, change) -> None:
    """A copy of the edge_m model under ``name`` whose config's dilseg metadata ``change`` edits."""
    shutil.copytree(repo / NAME, repo / name)
    cfg = parse_config(repo / name / "config.pbtxt")
    cfg.name = name
    meta = json.loads(cfg.parameters[METADATA_KEY].string_value)
    change(meta)
    cfg.parameters[METADATA_KEY].string_value = json.dumps(meta)
    (repo / name / "config.pbtxt").write_text(text_format.MessageToString(cfg))


# Triton's ONNX Runtime backend is not in the wheel's tritonserver: this Python-backend stand-in
# serves the onnxruntime_onnx repository's own config.pbtxt and model.onnx the way that backend
# does (the normalised tensor in, the graph's labels out), so the client's tensor path meets a
# real server.
ONNX_STAND_IN = '''
import json
from pathlib import Path
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input, self.output = config["input"][0]["name"], config["output"][0]["name"]
        self.session = ort.InferenceSession(str(Path(args["model_repository"]) / args["model_version"] / "model.onnx"),
                                            providers=["CPUExecutionProvider"])

    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, self.input).as_numpy()
            y = self.session.run(None, {self.input: x})[0]
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output, y)]))
        return out
'''


def onnx_platform_stand_in(repo: Path, name: str) -> None:
    assert export(MODEL, "-o", repo, "--name", name, "--platform", "onnxruntime_onnx", "--kind", "cpu") == 0
    cfg = parse_config(repo / name / "config.pbtxt")
    cfg.ClearField("platform")
    cfg.ClearField("default_model_filename")
    cfg.backend = "python"
    (repo / name / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    (repo / name / "1" / "model.py").write_text(ONNX_STAND_IN)


@pytest.fixture(scope="module")
def server(tmp_path_factory, sysvenv):
    reason = triton_missing(sysvenv)
    if reason:
        unavailable(reason)
    repo = tmp_path_factory.mktemp("triton") / "repo"
    assert export(MODEL, "-o", repo, "--platform", "python", "--threads", "1") == 0
    tamper(repo, "wrong_size", lambda m: m.update(input_size=[256, 320]))
    tamper(repo, "few_classes", lambda m: m.update(classes=m["classes"][:3], palette=m["palette"][:3]))
    tamper(repo, "idle", lambda m: None)  # never loaded
    tamper(repo, "broken", lambda m: None)  # fails to load: its ONNX is cut short
    onnx_file = repo / "broken" / "1" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    onnx_platform_stand_in(repo, "tensors")
    assert export(MODEL, "-o", repo, "--platform", "python", "--threads", "1", "--max-batch-size", "0",
                  "--name", "unbatched") == 0
    loaded = [f"--load-model={m}" for m in (NAME, "wrong_size", "few_classes", "tensors", "unbatched")]
    srv = TritonServer(repo, venv=sysvenv, args=["--model-control-mode=explicit", *loaded],
                       log_path=repo.parent / "tritonserver.log")
    srv.start()
    yield srv
    srv.stop(kill=True)


def url(server: TritonServer, model: str = NAME, http: bool = False) -> str:
    return f"triton+http://{server.http_url}/{model}" if http else f"triton://{server.grpc_url}/{model}"


@needs_camvid
@pytest.mark.parametrize("how, shared, transport", [
    ("grpc", False, "gRPC"), ("http", False, "HTTP"), ("grpc+shm", True, "gRPC + shared memory"),
    ("http+shm", True, "HTTP + shared memory"),
    ("grpc+auto", None, "gRPC + shared memory"),  # the default: a server on this machine gets shared memory
])
def test_labels_equal_in_process_onnxruntime_on_camvid_frames(server, how, shared, transport):
    frames = val_frames(3)
    with open_backend(MODEL, "onnxruntime") as local, open_backend(url(server, http=how.startswith("http")),
                                                    shared_memory=shared) as remote:
        assert remote.name == "triton" and remote.meta.classes == local.meta.classes
        assert remote.transport == transport and remote.describe()["transport"] == transport
        assert remote.capabilities.frame_input  # the Python-backend model takes frames
        here, there = Segmenter(local), Segmenter(remote)
        for frame in frames:
            np.testing.assert_array_equal(there.process(frame).labels, here.process(frame).labels)
        # A preprocessed batch (what bench's raw inference sends) gives the same labels too.
        from dilseg.runtime.preprocess import preprocess

        batch = np.concatenate([preprocess(f, local.meta) for f in frames[:2]])
        np.testing.assert_array_equal(remote.infer(batch), np.concatenate([local.infer(t[None]) for t in batch]))


@needs_camvid
def test_a_server_taking_tensors_gets_the_normalised_tensor(server):
    frames = val_frames(2)
    with open_backend(MODEL, "onnxruntime") as local, open_backend(url(server, "tensors")) as remote:
        assert not remote.capabilities.frame_input and remote.describe()["sends"] == "normalised tensors"
        here, there = Segmenter(local), Segmenter(remote)
        for frame in frames:
            np.testing.assert_array_equal(there.process(frame).labels, here.process(frame).labels)


@needs_camvid
def test_a_model_served_unbatched_takes_one_frame_at_a_time(server):
    cfg = parse_config(Path(server.repo) / "unbatched" / "config.pbtxt")
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching") and list(cfg.input[0].dims) == [1, -1, -1, 3]
    frame = val_frames(1)[0]
    with open_backend(MODEL, "onnxruntime") as local, open_backend(url(server, "unbatched")) as remote:
        assert remote.batch_range() == (1, 1)
        np.testing.assert_array_equal(Segmenter(remote).process(frame).labels, Segmenter(local).process(frame).labels)


@needs_camvid
def test_dynamic_batching_gathers_concurrent_streams(server):
    streams, rounds = 4, 5
    frames = val_frames(streams)
    with open_backend(MODEL, "onnxruntime") as local:
        want = [Segmenter(local).process(f).labels for f in frames]
    backends = [open_backend(url(server)) for _ in range(streams)]
    before = backends[0].statistics()
    gate = threading.Barrier(streams)
    got: dict[int, list] = {i: [] for i in range(streams)}

    def stream(i: int) -> None:
        seg = Segmenter(backends[i])
        for _ in range(rounds):
            gate.wait()
            got[i].append(seg.process(frames[i]).labels)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(streams):
        assert len(got[i]) == rounds and all((labels == want[i]).all() for labels in got[i])

    def executions(s: dict) -> dict[int, int]:
        return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in s.get("batch_stats", [])}

    # The server counts an execution after its responses have left, so the last ones may lag a little.
    deadline = time.monotonic() + 10
    while True:
        new = {size: n - executions(before).get(size, 0) for size, n in executions(backends[0].statistics()).items()}
        if sum(size * n for size, n in new.items()) >= streams * rounds or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for b in backends:
        b.close()
    assert sum(size * n for size, n in new.items()) == streams * rounds
    assert any(n > 0 for size, n in new.items() if size > 1), f"no batched execution: {new}"


def test_server_down_model_missing_and_not_ready_are_clear_errors(server):
    with pytest.raises(TritonUnavailable, match=r"cannot reach Triton Inference Server at 127\.0\.0\.1:\d+"):
        open_backend(f"triton://127.0.0.1:{free_port()}/{NAME}")
    with pytest.raises(TritonUnavailable, match="cannot reach"):
        open_backend(f"triton+http://127.0.0.1:{free_port()}/{NAME}", timeout=2)
    with pytest.raises(TritonModelError, match=r"has no model 'nope' \(it has: .*edge_m"):
        open_backend(url(server, "nope"))
    with pytest.raises(TritonModelError, match="'idle' is not ready \\(not loaded\\); load it"):
        open_backend(url(server, "idle", http=True))
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException):
        grpcclient.InferenceServerClient(server.grpc_url).load_model("broken")
    with pytest.raises(TritonModelError, match="'broken' is not ready \\(version 1: UNAVAILABLE \\(.*ONNX"):
        open_backend(url(server, "broken"))
    with pytest.raises(TritonModelError, match="has no version 7"):
        open_backend(url(server) + "/7")


def test_info_reads_the_served_model_from_the_server(server, capsys):
    assert main(["info", url(server, http=True)]) == 0
    out = capsys.readouterr().out
    assert "served by Triton" in out and "Sky" in out and "sends          BGR uint8 frames" in out
    assert main(["info", url(server), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["meta"]["classes"] == list(read_meta(MODEL).classes) and facts["served"]["max_batch_size"] == 8


def test_run_says_how_frames_travel(server):
    base = [sys.executable, "-m", "dilseg.runtime.cli", "run", "--model", url(server), "--source",
            "test://480x360?frames=3&live=0", "--quiet"]
    for flag, says in (([], "(triton, gRPC + shared memory)"), (["--shared-memory", "off"], "(triton, gRPC)")):
        r = subprocess.run(base + flag, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and says in r.stderr, r.stderr


def test_a_server_that_cannot_map_our_shared_memory(sysvenv, tmp_path, caplog):
    """A tritonserver with a /dev/shm of its own (a container without --ipc=host), for real: auto
    falls back to the socket and says why; --shared-memory on refuses with what to do."""
    from servers import can_unshare_mounts

    from dilseg.runtime.backends.triton_backend import TritonError

    reason = triton_missing(sysvenv) or can_unshare_mounts()
    if reason:
        unavailable(reason)
    repo = tmp_path / "repo"
    assert export(MODEL, "-o", repo, "--platform", "python", "--threads", "1") == 0
    srv = TritonServer(repo, venv=sysvenv, private_shm=True, log_path=tmp_path / "tritonserver.log")
    srv.start()
    try:
        frame = val_frames(1)[0] if (CAMVID / "val").is_dir() else np.full((360, 480, 3), 90, np.uint8)
        with caplog.at_level("WARNING", logger="dilseg.triton"):
            with open_backend(MODEL, "onnxruntime") as local, open_backend(url(srv)) as remote:
                assert remote.transport == "gRPC"
                np.testing.assert_array_equal(Segmenter(remote).process(frame).labels,
                                              Segmenter(local).process(frame).labels)
        assert any("cannot map this machine's shared memory" in r.getMessage() and "--ipc=host" in r.getMessage()
                   for r in caplog.records), caplog.text
        with pytest.raises(TritonError, match="--shared-memory on, but the server cannot use"):
            open_backend(url(srv), shared_memory=True)
        leftovers = [n for n in os.listdir("/dev/shm") if n.startswith(f"dilseg_{os.getpid()}_")]
        assert leftovers == [], leftovers  # the probe's regions are gone
    finally:
        srv.stop(kill=True)


def test_regions_of_killed_clients_are_removed_and_live_ones_kept(tmp_path):
    import fcntl

    from dilseg.runtime.backends.triton_backend import remove_orphaned_regions

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    names = [f"dilseg_{dead}_7f00aa_in", f"dilseg_{dead}_7f00aa_out",  # a killed client's
             f"dilseg_{dead}_7f00cc_in",  # a live client in another pid namespace: it holds its lock
             f"dilseg_{os.getpid()}_7f00bb_in", "dilseg_test_123_8000_x", "other_file"]
    for name in names:
        (tmp_path / name).write_bytes(b"x" * 64)
    held = os.open(tmp_path / names[2], os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_SH)
    try:
        assert sorted(remove_orphaned_regions(tmp_path)) == sorted(names[:2])
    finally:
        os.close(held)
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:])


def test_a_live_clients_regions_carry_its_lock(server):
    """For real: the regions an open backend made are locked while it runs, so another process's
    sweep keeps them, and they are gone once it closes."""
    import fcntl

    with open_backend(url(server)) as remote:
        Segmenter(remote).process(np.full((360, 480, 3), 90, np.uint8))
        mine = sorted(n for n in os.listdir("/dev/shm") if n.startswith(remote._shared.tag))
        assert len(mine) == 2  # in and out
        for name in mine:
            fd = os.open(f"/dev/shm/{name}", os.O_RDONLY)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
        sweep = "from dilseg.runtime.backends.triton_backend import remove_orphaned_regions as r; r()"
        subprocess.run([sys.executable, "-c", sweep], check=True, capture_output=True, timeout=120)
        assert sorted(n for n in os.listdir("/dev/shm") if n.startswith(remote._shared.tag)) == mine
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"dilseg_{os.getpid()}_")]


def test_regions_the_server_forgot_are_registered_again(server):
    """Another client unregisters every region (Triton's unregister-all): the next frame registers
    ours again instead of failing."""
    import tritonclient.grpc as grpcclient

    frame = np.full((360, 480, 3), 90, np.uint8)
    with open_backend(url(server), shared_memory=True) as remote:
        first = Segmenter(remote).process(frame).labels
        other = grpcclient.InferenceServerClient(server.grpc_url)
        other.unregister_system_shared_memory()
        assert other.get_system_shared_memory_status(as_json=True) == {}
        np.testing.assert_array_equal(Segmenter(remote).process(frame).labels, first)
        assert len(other.get_system_shared_memory_status(as_json=True)["regions"]) == 2
        other.close()


def test_cli_errors_are_one_line(server, capsys):
    assert main(["run", "--model", url(server, "nope"), "--max-frames", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dilseg run: error: ") and "has no model 'nope'" in err and err.count("\n") == 1
    assert main(["bench", "--model", url(server), "--threads", "2", "--frames", "1"]) == 2
    assert "--threads: ONNX Runtime option(s), but edge_m runs on Triton" in capsys.readouterr().err
    assert main(["run", "--model", "triton://127.0.0.1:8001/", "--max-frames", "1"]) == 2
    assert "name the model" in capsys.readouterr().err


def test_config_that_disagrees_with_the_model_is_a_mismatch(server):
    with pytest.raises(TritonMismatch, match="the input is -1x-1 but|the output is 360x480 but the metadata's input "
                                             "size is 256x320"):
        open_backend(url(server, "wrong_size"))
    few = open_backend(url(server, "few_classes"))
    try:
        assert few.meta.num_classes == 3
        street = val_frames(1)[0] if (CAMVID / "val").is_dir() else np.full((360, 480, 3), 90, np.uint8)
        with pytest.raises(TritonMismatch, match="returned class id \\d+ but the model's metadata lists 3 classes"):
            Segmenter(few).process(street)
    finally:
        few.close()


def test_a_stuck_server_times_out(server):
    backend = open_backend(url(server), timeout=1.0, reconnect=0)
    frame = np.full((360, 480, 3), 100, np.uint8)
    try:
        os.kill(server.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(TritonTimeout, match="no answer within 1 s"):
            backend.infer_frame(frame)
        assert time.monotonic() - t0 < 5
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert backend.infer_frame(frame).shape == (1, 360, 480)  # the server is fine once it runs again
    backend.close()


def test_closing_the_backend_ends_a_wait_for_a_lost_server(server):
    from dilseg.runtime.triton_url import parse_triton_url

    backend = open_backend(url(server), reconnect=60)
    backend.url = parse_triton_url(f"triton://127.0.0.1:{free_port()}/{NAME}")  # the server is gone from there
    backend._drop_clients()
    failure: list[BaseException] = []

    def infer() -> None:
        try:
            backend.infer_frame(np.zeros((360, 480, 3), np.uint8))
        except BaseException as exc:  # noqa: BLE001 - what the inference thread gets
            failure.append(exc)

    waiting = threading.Thread(target=infer)
    waiting.start()
    time.sleep(1.0)
    assert waiting.is_alive()  # reconnecting, as it would for up to 60 s
    t0 = time.monotonic()
    backend.close()  # what a stopped run does
    waiting.join(5)
    assert not waiting.is_alive() and time.monotonic() - t0 < 3
    assert isinstance(failure[0], TritonUnavailable) and "closed while waiting" in str(failure[0])


@pytest.mark.parametrize("how", ["grpc", "http+shm"])
def test_a_server_killed_and_restarted_mid_run_loses_no_frame(server, tmp_path, how):
    frames = 40
    labels = tmp_path / "labels"
    cmd = [sys.executable, "-m", "dilseg.runtime.cli", "run", "--model", url(server, http=how.startswith("http")),
           "--reconnect", "60", "--source", f"test://480x360?frames={frames}&live=0", "--labels", str(labels),
           "--quiet", "--shared-memory"] + ([] if how.endswith("shm") else ["off"])  # the bare flag: on
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(labels.glob("*.png"))) < 5 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run.poll() is None, run.communicate()
        server.kill()  # as a crash: connections vanish, the frame in flight gets no answer
        time.sleep(1.0)
        server.start()
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, err
    assert "lost Triton" in err and "reconnected" in err, err
    assert len(list(labels.glob("*.png"))) == frames
    assert f"frames in {frames}, out {frames}" in out


@needs_camvid
def test_demo_page_segments_through_triton(server, monkeypatch, downloads):
    import test_demo_app as demo

    at = demo.app(monkeypatch, url(server))  # `dilseg demo --model triton://...`
    assert not at.exception and not demo.messages(at)
    assert any("edge_m" in c.value and "triton://" in c.value for c in at.sidebar.caption)
    street = sorted((CAMVID / "val" / "images").iterdir())[0]
    at.file_uploader(key="image_upload").upload(street.name, street.read_bytes(), "image/png").run()
    assert not at.exception and not demo.messages(at)
    labels = demo.decode(downloads(demo.buttons(at)["Label PNG (class ids)"]))
    with open_backend(MODEL, "onnxruntime") as local:
        np.testing.assert_array_equal(labels, Segmenter(local)(cv2.imread(str(street))).labels)
    # A URL typed into the sidebar that names no model is said on the page, which stays usable.
    at.sidebar.radio(key="model_kind").set_value("triton").run()
    at.sidebar.text_input(key="model_url").input(url(server, "nope")).run()
    assert not at.exception and "has no model 'nope'" in demo.messages(at)


def test_a_multi_stream_run_batches_its_sources_into_one_request(server, tmp_path, capsys):
    with open_backend(url(server)) as backend:
        assert backend.batch_range() == (1, 8)
    source = "test://480x360?frames=6&live=0"
    report = tmp_path / "streams.json"
    assert main(["run", "--model", url(server), "--source", source, "--source", source, "--quiet",
                 "--json", str(report)]) == 0
    mean_batch = float(re.search(r"mean batch ([\d.]+)", capsys.readouterr().out).group(1))
    assert 1.0 < mean_batch <= 2.0  # frames of the two streams went to the server together
    assert [s["frames_out"] for s in json.loads(report.read_text())["streams"]] == [6, 6]


@needs_camvid
def test_eval_and_verify_through_triton(server, tmp_path, capsys):
    assert main(["eval", "--model", url(server), "--data", str(CAMVID), "--limit", "2", "--no-progress",
                 "--json", str(tmp_path / "eval.json")]) == 0
    served = json.loads((tmp_path / "eval.json").read_text())
    assert main(["eval", "--model", str(MODEL), "--backend", "onnxruntime", "--data", str(CAMVID), "--limit", "2",
                 "--no-progress", "--json", str(tmp_path / "local.json")]) == 0
    assert served["miou"] == json.loads((tmp_path / "local.json").read_text())["miou"]
    capsys.readouterr()
    assert main(["verify", str(MODEL), url(server, http=True), "--data", str(CAMVID),
                 "--limit", "2", "--no-progress", "--min-agreement", "99.99"]) == 0
    assert "PASS" in capsys.readouterr().out
