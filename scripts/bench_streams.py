"""Many live streams on one machine, side by side in one run: aggregate FPS and per-stream
latency for N = 1, 2, 4, 8 live test:// streams through each contender, interleaved.

    python scripts/bench_streams.py                          # N = 1,2,4,8, 20 s per row, 2 rounds
    python scripts/bench_streams.py --streams 4 --seconds 30 --rounds 3 --json streams.json

Every contender runs the backend and precision `--backend auto` picks for the model (pinned on
each command line: OpenVINO bf16 on a CPU with AMX, else ONNX Runtime), unless the extra options
name one. Contenders (a function each, in CONTENDERS; another script can add its own with the
same signature, e.g. N clients of a Triton server):
  processes             N separate `dilseg run --source test://...` processes (one stream each)
  processes-1t          the same with --threads 1 (one inference thread per process)
  multistream           one `dilseg run` with N --source as it runs by default: the model as it
                        is (on OpenVINO: the throughput hint, a batch of the streams' frames run as
                        parallel requests; on ONNX Runtime: one frame after another)
  multistream-2i        that with --instances 2: two batches at once (where the backend takes
                        calls from several threads; OpenVINO lends each its own requests)
  multistream-dyn       the same on the model's `--batch dynamic` copy: one inference per batch
  multistream-dyn-2x1t  that with --instances 2 --threads 1 (two batches at once, a thread each)
  one-by-one            the model as it is, one frame per inference (OpenVINO: --ov-hint latency)
  one-by-one-2x1t       that with --instances 2 --threads 1 (not on OpenVINO, which refuses it)

All run the same command line (`dilseg run`, overlay rendered, no output written), so they do
the same work per frame; every stream is a live test://WxH?fps=F camera (newest frame wins: a
slow consumer drops frames rather than queue them). A row starts its processes, waits until
each has started its streams, lets them run ``--seconds`` and stops them with SIGTERM; the
figures come from each run's --json, after ``--warmup`` frames per stream. Aggregate FPS: all
streams together; per-stream latency is capture -> written (p50: median over the streams, p95:
the worst stream's); spread: (fastest - slowest) / fastest per-stream FPS; batch: the mean
frames per inference; CPU ms/frame: the CPU time (every thread) the row's processes used over
its window per frame they delivered, which other load on the machine changes less than FPS (and
which does not favour many processes, as FPS does there: more threads get a larger share). Each
run's report must show every stream's frames inferred and rendered, or the script stops. Rounds
alternate the contenders' order, so a drift in the machine's load falls on both. Prints a table;
asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

DILSEG = [sys.executable, "-m", "dilseg.runtime.cli"]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_dilseg(commands: list[list[str]], reports: list[Path], seconds: float) -> list[dict]:
    """Start every `dilseg run` command, wait until each has started its streams (its first line
    on stderr), run ``seconds`` more, SIGTERM them all; the streams of their --json reports."""
    procs = [subprocess.Popen(cmd + ["--quiet", "--json", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for cmd, r in zip(commands, reports)]
    try:
        for p in procs:
            while not (line := p.stderr.readline()).startswith("dilseg run:"):  # warnings may come first
                if not line:  # it ended before its streams started
                    raise SystemExit(f"`dilseg run` failed to start ({p.wait()}): {' '.join(p.args)}")
                print(line, end="", file=sys.stderr)
        start, t0 = [cpu_seconds(p.pid) for p in procs], time.perf_counter()
        time.sleep(seconds)
        used, window = [cpu_seconds(p.pid) - c for p, c in zip(procs, start)], time.perf_counter() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
    streams = []
    for p, report in zip(procs, reports):
        _, err = p.communicate(timeout=120)
        if p.returncode not in (0, 128 + signal.SIGTERM) or not report.exists():  # stopped by SIGTERM: 143
            raise SystemExit(f"`dilseg run` failed ({p.returncode}):\n{err[-2000:]}")
        data = json.loads(report.read_text())
        # The work done, checked: every stream segmented its frames (each went through the
        # backend: its calls' items), and a multi-stream run's batches say how it shared it.
        batches = data.get("batches", {})
        entries = data.get("streams", [data])  # several sources: one entry per stream
        cpu = used[procs.index(p)] / len(entries)
        for s in entries:
            stages = s.get("stages_ms", {})
            if s["frames_out"] <= s["warmup"] or not all(stages.get(k, {}).get("n") for k in ("infer", "render")):
                raise SystemExit(f"`dilseg run` segmented and rendered no frame of {s.get('source', 'its source')} "
                                 f"after the warm-up: {' '.join(p.args)}")
            streams.append({"fps": s["fps"], "p50": s["latency_ms"]["p50"], "p95": s["latency_ms"]["p95"],
                            "dropped": s["dropped"], "frames": s["frames_out"] - s["warmup"],
                            "mean_batch": batches.get("mean_size", 1.0), "batching": data.get("batching", ""),
                            "cpu_s": cpu, "window_frames": s["fps"] * window})
        report.unlink()
    return streams


def processes(n: int, opts: argparse.Namespace, *more: str) -> list[dict]:
    """(a) N separate `dilseg run` processes, one live stream each."""
    cmd = DILSEG + ["run", "--model", opts.model, "--source", opts.source, "--warmup", str(opts.warmup),
                    *more] + opts.extra
    return run_dilseg([cmd] * n, [opts.workdir / f"proc_{k}.json" for k in range(n)], opts.seconds)


def one_run(model: str, n: int, opts: argparse.Namespace, *more: str) -> list[dict]:
    """One `dilseg run` with N live streams of ``model`` through one backend."""
    cmd = DILSEG + ["run", "--model", model, "--warmup", str(opts.warmup), *more] + opts.extra
    for _ in range(n):
        cmd += ["--source", opts.source]
    return run_dilseg([cmd], [opts.workdir / "multi.json"], opts.seconds)


def multistream(n: int, opts: argparse.Namespace, *more: str) -> list[dict]:
    """(b) one `dilseg run` with N sources, as it runs by default: the model as it is (on OpenVINO,
    a batch of the streams' frames runs as parallel requests; on ONNX Runtime, a graph fixed at one
    frame runs them one after another)."""
    return one_run(opts.model, n, opts, *more)


def multistream_dynamic(n: int, opts: argparse.Namespace, *more: str) -> list[dict]:
    """(b1) one `dilseg run` with N sources on the model's `--batch dynamic` copy: one inference
    of a batch of the streams' frames."""
    return one_run(opts.batch_model, n, opts, *more)


def one_by_one(n: int, opts: argparse.Namespace, *more: str) -> list[dict]:
    """(b3) one `dilseg run` with N sources, the model as it is, one frame per inference (on
    OpenVINO: --ov-hint latency, every core on each frame)."""
    hint = ["--ov-hint", "latency"] if opts.backend == "openvino" else []
    return one_run(opts.model, n, opts, *hint, *more)


def per_core(run: Callable[..., list[dict]], *more: str) -> Callable[[int, argparse.Namespace], list[dict]]:
    """A contender with one inference thread per inference (and ``more`` options)."""
    return lambda n, opts: run(n, opts, "--threads", "1", *more)


# name -> (what it is, function(N, options) -> one dict per stream: fps, p50, p95, dropped, frames)
CONTENDERS: dict[str, tuple[str, Callable[[int, argparse.Namespace], list[dict]]]] = {
    "processes": ("(a) N separate `dilseg run` processes", processes),
    "processes-1t": ("(a1) the same, --threads 1 each", per_core(processes)),
    "multistream": ("(b) one `dilseg run`, N sources (default)", multistream),
    "multistream-2i": ("(b') (b) with --instances 2", lambda n, opts: multistream(n, opts, "--instances", "2")),
    "multistream-dyn": ("(b1) the same, --batch dynamic model", multistream_dynamic),
    "multistream-dyn-2x1t": ("(b2) (b1) with --instances 2 --threads 1", per_core(multistream_dynamic,
                                                                               "--instances", "2")),
    "one-by-one": ("(b3) one run, one frame per inference", one_by_one),
    "one-by-one-2x1t": ("(b4) (b3) with --instances 2 --threads 1", per_core(one_by_one, "--instances", "2")),
}
# What runs unless --contenders says: several inferences at once (--instances) is refused by
# OpenVINO, whose parallel requests are its own batch mode.
DEFAULT_CONTENDERS = {"openvino": "processes,processes-1t,multistream,multistream-dyn,one-by-one"}
OTHER_CONTENDERS = "processes,processes-1t,multistream-dyn,multistream-dyn-2x1t,one-by-one-2x1t"


def combine(streams: list[dict]) -> dict:
    fps = [s["fps"] for s in streams]
    return {"aggregate_fps": sum(fps), "min_fps": min(fps), "max_fps": max(fps),
            "spread": (max(fps) - min(fps)) / max(fps) if max(fps) > 0 else 0.0,
            "p50_ms": statistics.median(s["p50"] for s in streams), "p95_ms": max(s["p95"] for s in streams),
            "mean_batch": statistics.mean(s["mean_batch"] for s in streams),
            # CPU per frame: what a frame costs whatever else runs on the machine meanwhile
            # (aggregate FPS alone favours many processes there: more threads, a larger share).
            "cpu_ms_per_frame": 1e3 * sum(s["cpu_s"] for s in streams) / max(1e-9, sum(s["window_frames"]
                                                                                     for s in streams)),
            "dropped": sum(s["dropped"] for s in streams)}


def machine() -> str:
    try:
        name = re.search(r"Model name:\s*(.+)", subprocess.run(["lscpu"], capture_output=True, text=True).stdout)
        cpu = name.group(1).strip() if name else "?"
    except OSError:
        cpu = "?"
    return f"{cpu}, {os.cpu_count()} CPUs"


def batch_model(model: str, workdir: Path) -> str:
    """``model`` with its batch axis freed (unchanged if it is free already), as batching needs."""
    out = workdir / (Path(model).stem + "_batch.onnx")
    r = subprocess.run(DILSEG + ["export", "onnx", "--from", model, "--batch", "dynamic", "-o", str(out)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        raise SystemExit(f"the multistream-dyn contenders need {Path(model).name} with a free batch axis, and it "
                         f"cannot have one: {r.stderr.strip()}\n(leave those contenders out, or pass --backend "
                         "onnxruntime to run the fp32 file)")
    return str(out)


def pin_backend(opts: argparse.Namespace) -> str:
    """Every contender runs the same backend at the same precision: what `--backend auto` picks
    for the model (unless the extra options name one), pinned on each command line, since the
    batch-freed copy has no variants beside it and auto alone would run it on another backend."""
    if "--backend" in opts.extra:
        return opts.extra[opts.extra.index("--backend") + 1]
    from dilseg.runtime.autoselect import pick

    choice = pick(Path(opts.model))
    if choice is None:
        return "auto"
    opts.model = str(choice.path)
    opts.extra = ["--backend", choice.backend,
                  *[a for k, v in choice.options.items() for a in (f"--{k.replace('_', '-')}", str(v))], *opts.extra]
    return choice.backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="1,2,4,8", help="stream counts N (default 1,2,4,8)")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds each row runs after its streams start "
                                                                "(default 20)")
    ap.add_argument("--rounds", type=int, default=2, help="times every row is measured, interleaved (default 2)")
    ap.add_argument("--warmup", type=int, default=5, help="frames per stream left out of the figures (default 5)")
    ap.add_argument("--source", default="test://480x360?fps=30", help="each stream's live source "
                                                                      "(default test://480x360?fps=30)")
    ap.add_argument("--model", default="", help="the .onnx (default: the shipped model)")
    ap.add_argument("--contenders", help=f"which, of {','.join(CONTENDERS)} (default on OpenVINO "
                                         f"{DEFAULT_CONTENDERS['openvino']}; else {OTHER_CONTENDERS})")
    ap.add_argument("--json", help="also write every measurement as JSON")
    opts, extra = ap.parse_known_args()
    opts.extra = extra  # passed to every `dilseg run` (e.g. --threads 1)
    from dilseg.runtime.defaults import default_model_path

    opts.model = opts.model or str(default_model_path())
    opts.backend = pin_backend(opts)
    counts = [int(n) for n in opts.streams.split(",")]
    chosen = [c for c in (opts.contenders or DEFAULT_CONTENDERS.get(opts.backend, OTHER_CONTENDERS)).split(",") if c]
    unknown = [c for c in chosen if c not in CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dilseg-bench-streams-") as tmp:
        opts.workdir = Path(tmp)
        # Only the batch-freed contenders need the copy (an int8 variant, for one, cannot have it).
        opts.batch_model = (batch_model(opts.model, opts.workdir)
                            if any(c.startswith("multistream-dyn") for c in chosen) else None)
        for r in range(opts.rounds):
            for n in counts:
                order = chosen if r % 2 == 0 else chosen[::-1]
                for name in order:
                    print(f"... round {r + 1}/{opts.rounds}, N={n}: {CONTENDERS[name][0]}", file=sys.stderr, flush=True)
                    streams = CONTENDERS[name][1](n, opts)
                    if r == 0 and streams[0]["batching"]:
                        print(f"    backend shared as: {streams[0]['batching']}", file=sys.stderr)
                    rows.append({"round": r, "contender": name, "streams": n, **combine(streams)})
    print(f"\nmachine: {machine()}; each stream {opts.source}; {opts.seconds:g} s per row after {opts.warmup} "
          f"warm-up frames, {opts.rounds} round(s) interleaved, mean shown; model {Path(opts.model).name}"
          + (f"; extra: {' '.join(opts.extra)}" if opts.extra else "") + "\n")
    print(f"{'contender':<42}{'N':>3}{'agg FPS':>9}{'stream FPS min/max':>20}{'spread':>8}{'p50 ms':>9}"
          f"{'p95 ms':>9}{'batch':>7}{'CPU ms/frame':>14}")
    table = {}
    for name in chosen:
        for n in counts:
            got = [row for row in rows if row["contender"] == name and row["streams"] == n]
            mean = {k: statistics.mean(row[k] for row in got) for k in got[0] if k not in ("round", "contender")}
            table[name, n] = mean
            print(f"{CONTENDERS[name][0]:<42}{n:>3}{mean['aggregate_fps']:>9.1f}{mean['min_fps']:>12.1f} /"
                  f"{mean['max_fps']:>6.1f}{mean['spread'] * 100:>7.0f}%{mean['p50_ms']:>9.0f}{mean['p95_ms']:>9.0f}"
                  f"{mean['mean_batch']:>7.2f}{mean['cpu_ms_per_frame']:>14.1f}")
    print()
    for multi in [c for c in chosen if not c.startswith("processes")]:
        for single in [c for c in chosen if c.startswith("processes")]:
            for n in counts:
                pairs = list(zip([row for row in rows if row["contender"] == multi and row["streams"] == n],
                                 [row for row in rows if row["contender"] == single and row["streams"] == n]))
                per_round = [m["aggregate_fps"] / p["aggregate_fps"] for m, p in pairs if p["aggregate_fps"] > 0]
                cheaper = [p["cpu_ms_per_frame"] / m["cpu_ms_per_frame"] for m, p in pairs if m["cpu_ms_per_frame"] > 0]
                print(f"N={n}: {multi} / {single} aggregate FPS {statistics.mean(per_round):.2f} (per round: "
                      f"{', '.join(f'{x:.2f}' for x in per_round)}); frames per CPU second "
                      f"{statistics.mean(cheaper):.2f}x; {multi} per-stream spread "
                      f"{table[multi, n]['spread'] * 100:.0f}%")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"machine": machine(), "source": opts.source, "seconds": opts.seconds,
                                               "rows": rows}, indent=2))
        print(f"wrote {opts.json}")


if __name__ == "__main__":
    main()
