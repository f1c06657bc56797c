"""Triton beside the in-process runs, in one interleaved run: scripts/bench_streams.py's rows
for N = 1, 2, 4, 8 live test:// streams ((a) N separate `dilseg run` processes, (b) one
multi-stream `dilseg run`, batched) plus (c) N `dilseg run` clients of one Triton server with
dynamic batching and (d) one multi-stream `dilseg run` whose backend is that server; then the
cost of the network hop at N = 1: the same frames segmented in-process and through Triton,
interleaved frame by frame, beside the floor of that hop (a model on the same server that
answers without doing any work).

    python scripts/bench_triton.py                                   # starts tritonserver itself
    python scripts/bench_triton.py --streams 1,4 --seconds 10 --rounds 1
    python scripts/bench_triton.py --url triton://127.0.0.1:8001/edge_m   # a server already running
    nice -n -10 python scripts/bench_triton.py --hop-only         # the hop alone, ahead of other work

Every contender runs the same ONNX on ONNX Runtime (default: the shipped fp32 model, whose batch
axis can be freed; its int8 `cpu` variant cannot batch): (a) and (b) get `--backend onnxruntime`
rather than auto's choice, and the server's Python-backend model (`dilseg export triton
--platform python`: dilseg's preprocessing and ONNX Runtime) serves the same file. Without --url the script writes that repository into a temporary folder and serves it
with the tritonserver of the Debian-python venv that scripts/ci_system.sh builds (started as
tests/servers.py starts it). Other options are bench_streams.py's. Prints tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench_streams as streams

REPO = Path(__file__).resolve().parents[1]
SERVED = {"url": ""}  # the model the Triton contenders use, set before bench_streams runs


def _client_args(extra: list[str]) -> list[str]:
    """bench_streams' extra `dilseg run` options without those that pick an in-process backend."""
    out, skip = [], False
    for arg in extra:
        if skip:
            skip = False
        elif arg in ("--backend", "--threads"):
            skip = True
        elif not arg.startswith(("--backend=", "--threads=")):
            out.append(arg)
    return out


def triton_clients(n: int, opts: argparse.Namespace) -> list[dict]:
    """(c) N `dilseg run` processes, each one live stream sent to the one Triton server."""
    cmd = streams.DILSEG + ["run", "--model", SERVED["url"], "--source", opts.source, "--warmup",
                            str(opts.warmup)] + _client_args(opts.extra)
    return streams.run_dilseg([cmd] * n, [opts.workdir / f"triton_{k}.json" for k in range(n)], opts.seconds)


def triton_multistream(n: int, opts: argparse.Namespace) -> list[dict]:
    """(d) one `dilseg run` with N live streams whose backend is the Triton server (its frames go
    to the server as one request per batch)."""
    cmd = streams.DILSEG + ["run", "--model", SERVED["url"], "--warmup", str(opts.warmup)] + _client_args(opts.extra)
    for _ in range(n):
        cmd += ["--source", opts.source]
    return streams.run_dilseg([cmd], [opts.workdir / "triton_multi.json"], opts.seconds)


streams.CONTENDERS["triton"] = ("(c) N `dilseg run` clients of one Triton", triton_clients)
streams.CONTENDERS["triton-multistream"] = ("(d) one `dilseg run`, N sources, on Triton", triton_multistream)


# A Python-backend model that answers every request with labels of the right shape and does no
# work: served beside the real one, its round trip is the floor of the hop (gRPC, Triton's
# scheduler, the stub's hand-offs, the tensors' copies) that no model.py can go below.
EMPTY_MODEL = """
import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        out = json.loads(args["model_config"])["output"][0]
        self.labels = np.zeros([1] + [int(d) for d in out["dims"]], np.uint8 if out["data_type"] == "TYPE_UINT8" else np.int32)

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("labels", self.labels)]) for _ in requests]
"""
EMPTY_SUFFIX = "_empty"


def hop_cost(model: str, url: str, frames: int, threads: int = 0, floor: bool = False) -> tuple[dict, dict]:
    """Per-frame time of Segmenter.process (preprocess, infer, postprocess) in-process on ONNX
    Runtime and through Triton with and without shared memory, round robin frame by frame (each
    frame starting with the next contender, so none always follows the same one). ``floor``:
    the same through the server's empty model as well (``url`` + EMPTY_SUFFIX)."""
    import cv2

    from dilseg.runtime.backends import open_backend
    from dilseg.runtime.segmenter import Segmenter

    camvid = REPO.parent / "shared" / "data" / "camvid" / "val" / "images"
    paths = sorted(camvid.iterdir())[:10] if camvid.is_dir() else []
    pics = [cv2.imread(str(p)) for p in paths] or [np.random.default_rng(0).integers(0, 255, (360, 480, 3), np.uint8)]
    local = open_backend(model, "onnxruntime", **({"threads": threads} if threads else {}))
    contenders = {"in-process ONNX Runtime": Segmenter(local),
                  "Triton gRPC": Segmenter(open_backend(url, shared_memory=False)),
                  "Triton gRPC + shared memory": Segmenter(open_backend(url, shared_memory=True))}
    if floor:
        contenders["floor: empty model, gRPC"] = Segmenter(open_backend(url + EMPTY_SUFFIX, shared_memory=False))
        contenders["floor: empty model, shared memory"] = Segmenter(open_backend(url + EMPTY_SUFFIX, shared_memory=True))
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for seg in contenders.values():  # warm-up
        for pic in pics[:3]:
            seg.process(pic)
    before = contenders["Triton gRPC"].backend.statistics()
    order = list(contenders.items())
    for i in range(frames):  # every contender sees the same load
        for name, seg in order[i % len(order):] + order[:i % len(order)]:
            t0 = time.perf_counter()
            seg.process(pics[i % len(pics)])
            times[name].append((time.perf_counter() - t0) * 1e3)
    after = contenders["Triton gRPC"].backend.statistics()
    for seg in contenders.values():
        seg.close()
    base = times["in-process ONNX Runtime"]
    out = {name: {"p50_ms": float(np.median(t)), "p95_ms": float(np.percentile(t, 95)), "mean_ms": float(np.mean(t)),
                  "hop_ms": float(np.median(t) - np.median(base)), "hop_mean_ms": float(np.mean(t) - np.mean(base)),
                  # frame i of each contender ran within one round: their difference sees the same load
                  "hop_paired_ms": float(np.median(np.subtract(t, base)))}
           for name, t in times.items()}
    return out, server_side(before, after)


def server_side(before: dict, after: dict) -> dict:
    """Mean milliseconds per request the server spent, from its statistics: queued, and in the
    model (inputs in, model.py's normalisation and ONNX Runtime, outputs out)."""
    def total(stats: dict, key: str) -> tuple[int, int]:
        entry = stats.get("inference_stats", {}).get(key, {})
        return int(entry.get("count", 0)), int(entry.get("ns", 0))

    n = total(after, "success")[0] - total(before, "success")[0]
    spent = {k: (total(after, k)[1] - total(before, k)[1]) / 1e6 / max(n, 1)
             for k in ("queue", "compute_input", "compute_infer", "compute_output")}
    return {"requests": n, **spent}


def add_empty_model(repo: Path, name: str) -> None:
    """REPO/NAME_empty: NAME's config (same tensors, batching, instance) with EMPTY_MODEL as model.py."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    cfg.name = name + EMPTY_SUFFIX
    (repo / cfg.name / "1").mkdir(parents=True)
    (repo / cfg.name / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    (repo / cfg.name / "1" / "model.py").write_text(EMPTY_MODEL)


def start_server(model: Path, repo: Path, max_batch: int, threads: int = 0):
    import subprocess

    sys.path.insert(0, str(REPO / "tests"))
    from servers import SystemVenv, TritonServer, triton_missing

    from dilseg.runtime.artifact import read_meta

    venv = SystemVenv()
    reason = venv.missing() or triton_missing(venv)
    if reason:
        raise SystemExit(f"cannot start tritonserver: {reason}; run `bash scripts/ci_system.sh` or pass --url")
    subprocess.run(streams.DILSEG + ["export", "triton", str(model), "-o", str(repo), "--platform", "python",
                                     "--max-batch-size", str(max_batch), "--threads", str(threads)], check=True,
                   stdout=subprocess.DEVNULL)
    add_empty_model(repo, read_meta(model).model)
    return TritonServer(repo, venv=venv, log_path=repo.parent / "tritonserver.log").start()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 add_help=False)
    ap.add_argument("--url", default="", help="a running server's model (default: start one here)")
    ap.add_argument("--hop-frames", type=int, default=200, help="frames per contender for the hop (default 200)")
    ap.add_argument("--model", default="", help="the .onnx every contender runs (default: see above)")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--hop-only", action="store_true", help="only the network hop at N=1, no stream rows")
    ap.add_argument("--hop-threads", type=int, default=0,
                    help="ONNX Runtime threads in-process and in the server for the hop (default: the backends')")
    mine, rest = ap.parse_known_args()
    if "-h" in rest or "--help" in rest:
        ap.print_help()
        print("\nbench_streams.py options (passed through):")
        sys.argv = [sys.argv[0], "--help"]
        streams.main()
        return
    from dilseg.runtime.defaults import default_model_path

    model = Path(mine.model) if mine.model else default_model_path()
    counts = [int(n) for n in mine.streams.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="dilseg-bench-triton-")
    server = None
    try:
        if mine.url:
            SERVED["url"] = mine.url
        else:
            server = start_server(model, Path(tmp.name) / "repo", max(8, max(counts)), mine.hop_threads)
            from dilseg.runtime.artifact import read_meta

            SERVED["url"] = f"triton://{server.grpc_url}/{read_meta(model).model}"
        print(f"model {model} on ONNX Runtime in every contender; Triton: {SERVED['url']} (Python backend, dynamic "
              "batching)", file=sys.stderr)
        if not mine.hop_only:
            sys.argv = [sys.argv[0], "--model", str(model), "--streams", mine.streams, *rest, "--backend",
                        "onnxruntime"]
            streams.main()
        print(f"... network hop, {mine.hop_frames} frames each", file=sys.stderr, flush=True)
        hop, server_ms = hop_cost(str(model), SERVED["url"], mine.hop_frames, mine.hop_threads, floor=server is not None)
    finally:
        if server is not None:
            server.stop()
        tmp.cleanup()
    load = "load average {:.1f} {:.1f} {:.1f}, nice {}".format(*os.getloadavg(), os.nice(0))
    threads = f"{mine.hop_threads} ONNX Runtime thread(s) on both sides" if mine.hop_threads else "default threads"
    print(f"\nthe network hop at N=1 ({streams.machine()}, {load}; {model.name}, {threads}; every frame segmented by "
          f"each contender in turn, {mine.hop_frames} frames each)\n")
    print(f"{'per frame: preprocess + infer + postprocess':<44}{'p50 ms':>9}{'p95 ms':>9}{'mean ms':>9}"
          f"{'hop p50':>9}{'hop mean':>10}{'hop paired':>12}")
    for name, h in hop.items():
        hops = "" if name.startswith("floor") else \
            f"{h['hop_ms']:>9.2f}{h['hop_mean_ms']:>10.2f}{h['hop_paired_ms']:>12.2f}"
        print(f"{name:<44}{h['p50_ms']:>9.2f}{h['p95_ms']:>9.2f}{h['mean_ms']:>9.2f}{hops}")
    print("(hop p50 / mean: the difference of the contenders' medians / means; hop paired: the median over frames of "
          "each frame's time minus the in-process time of the same frame in the same round)")
    if any(name.startswith("floor") for name in hop):
        print("(floor: the same server's model that returns labels without any work; the hop cannot go below its "
              "own time)")
    print(f"\nthe server, mean per request over {server_ms['requests']}: queued {server_ms['queue']:.2f} ms, inputs in "
          f"{server_ms['compute_input']:.2f} ms, model.py (normalise + ONNX Runtime) {server_ms['compute_infer']:.2f} ms, "
          f"outputs out {server_ms['compute_output']:.2f} ms")


if __name__ == "__main__":
    main()
