"""Many streams, side by side in one run: N live test:// streams through (a) N separate in-process
runs (ONNX Runtime in each process), (b) one multi-stream `dilseg run` with N --source (frames
of N sources batched into one inference on one backend, the model's batch axis freed with
`dilseg export onnx --from M --batch dynamic`), (c) N client processes of one Triton server with
dynamic batching and (d) one multi-stream run whose backend is that server; then the cost of
the network hop: the same frames segmented in-process and through Triton at N = 1, interleaved.

    python scripts/bench_triton.py                                # starts tritonserver itself (tests' venv)
    python scripts/bench_triton.py --streams 1,4 --seconds 8 --json triton.json
    python scripts/bench_triton.py --url triton://127.0.0.1:8001/edge_m   # a server already running

Every stream is a live test://WxH?fps=F source (newest frame wins, so a slow consumer drops
frames instead of queuing them): the aggregate FPS is what all streams together got, per-stream
latency is capture -> labels of the frames a stream kept (p50: median over streams, p95: the
worst stream's). The clients of a row start together (a shared start time) and run the same
wall time. Without --url the script exports the shipped model with `dilseg export triton
--platform python` (dilseg's preprocessing and ONNX Runtime in the server) into a temporary
repository and serves it with the tritonserver of the Debian-python venv that
scripts/ci_system.sh builds (tests/servers.py starts it). Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One stream (run in its own process): open, wait for the shared start, run, print JSON."""
    from dilseg.runtime.backends import open_backend
    from dilseg.runtime.pipeline import Pipeline
    from dilseg.runtime.segmenter import Segmenter
    from dilseg.runtime.sources import open_source

    options = {"shared_memory": True} if args.shared_memory else {}
    backend = open_backend(args.model, **options)
    time.sleep(max(0.0, args.start_at - time.time()))
    with open_source(args.source) as source:
        pipeline = Pipeline(source, Segmenter(backend), [], view=None, warmup=args.warmup)
        timer = threading.Timer(args.seconds, pipeline.stop)
        timer.start()
        stats = pipeline.run()
        timer.cancel()
    backend.close()
    lat = stats.stages["latency"] if "latency" in stats.stages else None
    print(json.dumps({"fps": stats.fps, "frames": stats.measured_frames, "dropped": stats.dropped,
                      "p50": lat.percentile(50) if lat else float("nan"),
                      "p95": lat.percentile(95) if lat else float("nan")}))


def run_streams(model: str, n: int, source: str, seconds: float, warmup: int, shared_memory: bool = False) -> dict:
    """N worker processes on ``model``, started together; their stats combined."""
    start_at = time.time() + 4.0 + 0.5 * n  # time for every process to import and connect
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--source", source, "--seconds", str(seconds),
           "--warmup", str(warmup), "--start-at", str(start_at)] + (["--shared-memory"] if shared_memory else [])
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    streams = []
    for p in procs:
        out, err = p.communicate(timeout=seconds + 120)
        if p.returncode != 0:
            raise SystemExit(f"a stream failed ({p.returncode}):\n{err[-2000:]}")
        streams.append(json.loads(out.strip().splitlines()[-1]))
    return combine(streams)


def combine(streams: list[dict]) -> dict:
    fps = [s["fps"] for s in streams]
    return {"streams": len(streams), "aggregate_fps": sum(fps), "min_fps": min(fps), "max_fps": max(fps),
            "p50_ms": statistics.median(s["p50"] for s in streams), "p95_ms": max(s["p95"] for s in streams),
            "dropped": sum(s["dropped"] for s in streams)}


def multi_stream_supported() -> bool:
    """Whether `dilseg run` takes several --source (the batched multi-stream run) and --json."""
    out = subprocess.run([sys.executable, "-m", "dilseg.runtime.cli", "run", "--help"], capture_output=True,
                         text=True).stdout
    return "--source A --source B" in out or ("repeat for several streams" in " ".join(out.split())
                                              and "--json" in out)


def run_multi_stream(model: str, n: int, source: str, seconds: float, workdir: Path) -> dict:
    """One `dilseg run` with N sources, stopped with SIGTERM ``seconds`` after its streams start;
    the per-stream figures come from its --json."""
    report = workdir / f"multi_{n}.json"
    cmd = [sys.executable, "-m", "dilseg.runtime.cli", "run", "--model", model, "--quiet", "--json", str(report)]
    for _ in range(n):
        cmd += ["--source", source]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = p.stderr.readline()  # "dilseg run: ... on N sources ...": the streams are running
    if not started.startswith("dilseg run:"):
        p.kill()
        raise SystemExit(f"multi-stream run failed to start: {started}{p.stderr.read()[-2000:]}")
    time.sleep(seconds)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    if p.returncode != 0 or not report.exists():
        raise SystemExit(f"multi-stream run failed ({p.returncode}):\n{err[-2000:]}")
    streams = [{"fps": s["fps"], "p50": s["latency_ms"]["p50"], "p95": s["latency_ms"]["p95"],
                "dropped": s["dropped"]} for s in json.loads(report.read_text())["streams"]]
    return combine(streams)


def batch_model(model: str, workdir: Path) -> str:
    """The model with a free batch axis, as the multi-stream run needs to batch."""
    out = workdir / (Path(model).stem + "_batch.onnx")
    subprocess.run([sys.executable, "-m", "dilseg.runtime.cli", "export", "onnx", "--from", model, "--batch",
                    "dynamic", "-o", str(out)], check=True, stdout=subprocess.DEVNULL)
    return str(out)


def hop_cost(local_model: str, url: str, frames: int) -> dict:
    """Per-frame time (Segmenter.process: preprocess, infer, postprocess) in-process and through
    Triton, with and without shared memory, interleaved frame by frame."""
    import cv2

    from dilseg.runtime.backends import open_backend
    from dilseg.runtime.segmenter import Segmenter

    camvid = REPO.parent / "shared" / "data" / "camvid" / "val" / "images"
    paths = sorted(camvid.iterdir())[:10] if camvid.is_dir() else []
    pics = [cv2.imread(str(p)) for p in paths] or [np.random.default_rng(0).integers(0, 255, (360, 480, 3), np.uint8)]
    contenders = {"in-process ONNX Runtime": Segmenter(open_backend(local_model)),
                  "Triton gRPC": Segmenter(open_backend(url)),
                  "Triton gRPC + shared memory": Segmenter(open_backend(url, shared_memory=True))}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for seg in contenders.values():  # warm-up
        for pic in pics[:3]:
            seg.process(pic)
    for i in range(frames):  # round robin, frame by frame: every contender sees the same load
        for name, seg in contenders.items():
            t0 = time.perf_counter()
            seg.process(pics[i % len(pics)])
            times[name].append((time.perf_counter() - t0) * 1e3)
    for seg in contenders.values():
        seg.close()
    base = float(np.median(times["in-process ONNX Runtime"]))
    return {name: {"p50_ms": float(np.median(t)), "p95_ms": float(np.percentile(t, 95)),
                   "hop_ms": float(np.median(t)) - base} for name, t in times.items()}


def start_server(repo: Path):
    sys.path.insert(0, str(REPO / "tests"))
    from servers import SystemVenv, TritonServer, triton_missing

    venv = SystemVenv()
    reason = venv.missing() or triton_missing(venv)
    if reason:
        raise SystemExit(f"cannot start tritonserver: {reason}; run `bash scripts/ci_system.sh` or pass --url")
    return TritonServer(repo, venv=venv, log_path=repo.parent / "tritonserver.log").start()


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except (OSError, AttributeError):
        name = platform.processor() or "?"
    load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return f"{name}, {os.cpu_count()} logical CPUs{load}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="1,2,4,8", help="stream counts N (default 1,2,4,8)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per row (default 10)")
    ap.add_argument("--warmup", type=int, default=10, help="frames per stream left out of the figures (default 10)")
    ap.add_argument("--source", default="test://480x360?fps=30", help="each stream's live source")
    ap.add_argument("--model", default="", help="the in-process model (default: the shipped one)")
    ap.add_argument("--url", default="", help="a running server's model (default: start one here)")
    ap.add_argument("--hop-frames", type=int, default=200, help="frames per contender for the hop cost (default 200)")
    ap.add_argument("--json", help="also write the figures as JSON")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--shared-memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from dilseg.runtime.defaults import default_model_path

    local = args.model or str(default_model_path())
    counts = [int(n) for n in args.streams.split(",")]
    server, url = None, args.url
    tmp = tempfile.TemporaryDirectory(prefix="dilseg-bench-triton-")
    if not url:
        repo = Path(tmp.name) / "repo"
        subprocess.run([sys.executable, "-m", "dilseg.runtime.cli", "export", "triton", local, "-o", str(repo),
                        "--platform", "python", "--max-batch-size", str(max(8, max(counts)))], check=True,
                       stdout=subprocess.DEVNULL)
        server = start_server(repo)
        from dilseg.runtime.artifact import read_meta

        url = f"triton://{server.grpc_url}/{read_meta(local).model}"
    try:
        kinds = {"(a) N processes, in-process ONNX Runtime": lambda n: run_streams(local, n, args.source, args.seconds,
                                                                                    args.warmup),
                 "(c) N clients of one Triton server": lambda n: run_streams(url, n, args.source, args.seconds,
                                                                              args.warmup)}
        if multi_stream_supported():
            batched = batch_model(local, Path(tmp.name))
            kinds["(b) one multi-stream run, batched"] = lambda n: run_multi_stream(batched, n, args.source,
                                                                                     args.seconds, Path(tmp.name))
            kinds["(d) one multi-stream run through Triton"] = lambda n: run_multi_stream(url, n, args.source,
                                                                                           args.seconds, Path(tmp.name))
        rows = []
        for n in counts:  # interleaved: every kind at one N before the next N
            for name, fn in kinds.items():
                print(f"... {name}, N={n}", file=sys.stderr, flush=True)
                rows.append({"kind": name, **fn(n)})
        print(f"... network hop, {args.hop_frames} frames each", file=sys.stderr, flush=True)
        hop = hop_cost(local, url, args.hop_frames)
    finally:
        if server is not None:
            server.stop()
        tmp.cleanup()

    print(f"\nmachine: {cpu_name()}; source per stream: {args.source}; {args.seconds:g} s per row; model "
          f"{Path(local).name}; Triton: {url} (Python backend, dynamic batching)\n")
    print(f"{'kind':<44}{'N':>3}{'agg FPS':>9}{'min/max stream FPS':>20}{'p50 ms':>9}{'p95 ms':>9}")
    for r in sorted(rows, key=lambda r: (r["kind"], r["streams"])):
        print(f"{r['kind']:<44}{r['streams']:>3}{r['aggregate_fps']:>9.1f}"
              f"{r.get('min_fps', float('nan')):>11.1f} /{r.get('max_fps', float('nan')):>6.1f}"
              f"{r.get('p50_ms', float('nan')):>9.1f}{r.get('p95_ms', float('nan')):>9.1f}")
    print(f"\n{'per frame, N=1, interleaved':<44}{'p50 ms':>9}{'p95 ms':>9}{'hop (p50) ms':>14}")
    for name, h in hop.items():
        print(f"{name:<44}{h['p50_ms']:>9.2f}{h['p95_ms']:>9.2f}{h['hop_ms']:>14.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": cpu_name(), "rows": rows, "hop": hop}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
