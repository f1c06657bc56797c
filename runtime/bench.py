"""`dilseg bench`: the pipeline's per-stage latency and end-to-end FPS next to the raw inference
throughput of the same model on the same input, so the pipeline's overhead is visible. The raw
figure times the pipeline's own call (``infer_frame`` on a backend that takes frames); with CUDA
graphs on, that call is timed with and without them in interleaved rounds."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .backends import Backend
from .files import atomic_write_bytes
from .pipeline import FrameResult, Pipeline, PipelineStats, StageTimes
from .preprocess import preprocess
from .segmenter import Segmenter
from .sinks import Sink
from .sources import Source, SourceError


def rss_bytes() -> int | None:
    """Current resident set size of this process (Linux /proc, else psutil, else None)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return None


def peak_rss_bytes() -> int:
    """Peak resident set size so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class RssProbe:
    """An ``on_result`` callback noting RSS once warm (after ``after`` frames) and at every frame
    since, cheaply: RSS at warm-up end and at the last frame show whether memory grows."""

    def __init__(self, after: int = 100) -> None:
        self.after = after
        self.warm: int | None = None
        self.last: int | None = None
        self.frames = 0

    def __call__(self, result: FrameResult) -> None:
        self.frames += 1
        if self.frames == self.after:
            self.warm = rss_bytes()
        elif self.frames > self.after and self.frames % 50 == 0:
            self.last = rss_bytes()

    def end(self) -> None:
        if self.frames >= self.after:
            self.last = rss_bytes()


@dataclass
class BenchResult:
    model: str
    backend: str
    source: str
    live: bool
    frames: int
    warmup: int
    pipeline: dict  # PipelineStats.to_dict()
    raw_fps: float
    raw_ms: dict  # {p50, p95, mean} of back-to-back backend.infer
    raw_stages_ms: dict = field(default_factory=dict)  # backend-reported split (TensorRT: gpu_upload/gpu_infer/...)
    raw_call: str = "infer"  # what was timed: the pipeline's own call (infer, or infer_frame on a GPU-frame backend)
    # --cuda-graph: the same call without the graph, in rounds interleaved with the graph's ({fps, ms, stages_ms})
    raw_without_graph: dict | None = None
    peak_rss_mib: float = 0.0
    rss_warm_mib: float | None = None
    rss_end_mib: float | None = None

    @property
    def e2e_fps(self) -> float:
        return self.pipeline["fps"]

    @property
    def ratio(self) -> float:
        return self.e2e_fps / self.raw_fps if self.raw_fps else 0.0

    @property
    def graph_speedup(self) -> float | None:
        """Raw FPS with the CUDA graph over raw FPS without it (same call, interleaved rounds)."""
        other = self.raw_without_graph
        return self.raw_fps / other["fps"] if other and other["fps"] else None

    def to_dict(self) -> dict:
        return {**asdict(self), "e2e_fps": self.e2e_fps, "ratio": self.ratio, "graph_speedup": self.graph_speedup}

    def report(self) -> str:
        p = self.pipeline
        lines = [f"model {self.model}  backend {self.backend}  source {self.source}"
                 + ("  (live: end-to-end FPS is bounded by the source's rate)" if self.live else ""),
                 "", f"{'pipeline stage':<16}{'p50 ms':>9}{'p95 ms':>9}{'mean ms':>9}"]
        for name, s in p["stages_ms"].items():
            lines.append(f"{name:<16}{s['p50']:>9.2f}{s['p95']:>9.2f}{s['mean']:>9.2f}")
        lines += ["", f"{'raw inference':<16}{'p50 ms':>9}{'p95 ms':>9}{'mean ms':>9}",
                  f"{'infer':<16}{self.raw_ms['p50']:>9.2f}{self.raw_ms['p95']:>9.2f}{self.raw_ms['mean']:>9.2f}"]
        for name, s in self.raw_stages_ms.items():
            lines.append(f"{'  ' + name:<16}{s['p50']:>9.2f}{s['p95']:>9.2f}{s['mean']:>9.2f}")
        other = self.raw_without_graph
        if other:
            ms = other["ms"]
            lines.append(f"{'no CUDA graph':<16}{ms['p50']:>9.2f}{ms['p95']:>9.2f}{ms['mean']:>9.2f}")
            for name, s in other["stages_ms"].items():
                lines.append(f"{'  ' + name:<16}{s['p50']:>9.2f}{s['p95']:>9.2f}{s['mean']:>9.2f}")
        lines += [
            "",
            f"frames: {p['frames_out'] - p['warmup']} measured after {p['warmup']} warm-up; "
            f"dropped {p['dropped']}, corrupt skipped {p['corrupt_skipped']}",
            f"end-to-end FPS:     {self.e2e_fps:8.1f}   (source -> sinks, all threads)",
            f"raw inference FPS:  {self.raw_fps:8.1f}   (back-to-back backend.{self.raw_call}, the pipeline's call, "
            "same model, same input)",
            f"end-to-end / raw:   {self.ratio:8.2f}",
            f"peak RSS:           {self.peak_rss_mib:8.1f} MiB"
            + (f"   (warm {self.rss_warm_mib:.1f} MiB, end {self.rss_end_mib:.1f} MiB)"
               if self.rss_warm_mib is not None and self.rss_end_mib is not None else ""),
        ]
        if other:
            lines.insert(-2, f"  without the CUDA graph: {other['fps']:8.1f}   (same call, rounds interleaved with "
                             f"the graph's): the graph gives {self.graph_speedup:.2f}x")
        return "\n".join(lines)

    def write_json(self, path: str | Path) -> None:
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2, default=float).encode())


def _summary(times: StageTimes) -> dict:
    return {"p50": times.percentile(50), "p95": times.percentile(95), "mean": times.mean, "n": times.count}


class _CallTimes:
    """Wall times of one kind of call, and the backend's own split of each."""

    def __init__(self, backend: Backend, n: int) -> None:
        self.backend, self.n = backend, max(n, 1)
        self.total, self.split, self.seconds = StageTimes(self.n), {}, 0.0

    def run(self, call: Callable[[], object], count: int) -> None:
        own = self.backend.capabilities.stage_timings
        t_start = time.perf_counter()
        for _ in range(count):
            t0 = time.perf_counter()
            call()
            self.total.add((time.perf_counter() - t0) * 1e3)
            for key, ms in (self.backend.last_timings.items() if own else ()):
                self.split.setdefault(key, StageTimes(self.n)).add(ms)
        self.seconds += time.perf_counter() - t_start

    def result(self) -> tuple[float, dict, dict]:
        fps = self.total.count / self.seconds if self.seconds > 0 else 0.0
        return fps, _summary(self.total), {k: _summary(v) for k, v in self.split.items()}


def raw_inference(backend: Backend, tensor: np.ndarray, frames: int, warmup: int) -> tuple[float, dict, dict]:
    """Back-to-back ``backend.infer`` on one tensor: (FPS, {p50,p95,mean} ms of the call's wall time,
    the backend's own split where it reports one)."""
    for _ in range(warmup):
        backend.infer(tensor)
    times = _CallTimes(backend, frames)
    times.run(lambda: backend.infer(tensor), frames)
    return times.result()


def pipeline_call(backend: Backend, frame: np.ndarray) -> tuple[Callable[[], object], str]:
    """The call the pipeline makes for ``frame`` (as the Segmenter chooses it), ready to repeat,
    and its name: ``infer_frame`` on a backend that takes frames, else ``infer`` of the tensor."""
    if backend.capabilities.frame_input:
        return (lambda: backend.infer_frame(frame)), "infer_frame"
    tensor = preprocess(frame, backend.meta)
    return (lambda: backend.infer(tensor)), "infer"


def graph_modes(backend: Backend) -> tuple[bool | None, ...]:
    """(True, False) when the backend replays CUDA graphs (--cuda-graph): the raw figure is then
    timed with and without them; else (None,): as the backend is."""
    on = backend.capabilities.cuda_graph and bool(getattr(backend.options, "cuda_graph", False))
    return (True, False) if on else (None,)


def raw_calls(backend: Backend, call: Callable[[], object], frames: int, warmup: int,
              modes: tuple[bool | None, ...] = (None,), rounds: int = 10) -> dict:
    """Back-to-back ``call()``: {mode: (FPS, ms summary, backend split)}. Several modes (CUDA graph
    on/off) alternate in ``rounds`` rounds, the order reversed every round, so each sees the same
    machine state; the backend is left in its first mode."""
    def switch(mode: bool | None) -> None:
        if mode is not None:
            backend.set_cuda_graph(mode)

    times = {m: _CallTimes(backend, frames) for m in modes}
    for m in modes:
        switch(m)
        for _ in range(warmup):  # also captures each mode's graph before timing
            call()
    rounds = max(1, min(rounds, frames)) if len(modes) > 1 else 1
    done = 0
    try:
        for r in range(rounds):
            count = (frames - done) // (rounds - r)
            for m in (modes if r % 2 == 0 else modes[::-1]):
                switch(m)
                times[m].run(call, count)
            done += count
    finally:
        switch(modes[0])
    return {m: t.result() for m, t in times.items()}


def bench(source: Source, backend: Backend, frames: int = 200, warmup: int = 20, model: str = "",
          progress: bool = False) -> BenchResult:
    """Run the pipeline (sink: none) for ``warmup + frames`` frames, then time the backend alone
    on the last frame the pipeline saw, preprocessed the same way."""
    if frames < 1 or warmup < 0:
        raise ValueError("frames must be >= 1 and warmup >= 0")
    segmenter = Segmenter(backend)
    probe = RssProbe(after=max(1, warmup))
    last: dict = {}

    def keep(result: FrameResult) -> None:
        last["frame"] = result.frame
        probe(result)

    stats: PipelineStats = Pipeline(source, segmenter, [Sink()], max_frames=warmup + frames, warmup=warmup,
                                    on_result=keep, progress=progress).run()
    probe.end()
    if "frame" not in last:
        raise SourceError(f"{source.spec}: the source gave no frame to benchmark; check it with `dilseg run --source ...`")
    call, call_name = pipeline_call(backend, last["frame"])
    modes = graph_modes(backend)
    raw = raw_calls(backend, call, max(1, stats.measured_frames or frames), max(min(warmup, 10), 1 if modes[0] else 0),
                    modes)
    raw_fps, raw_ms, raw_split = raw[modes[0]]
    without = None
    if False in raw:
        fps, ms, split = raw[False]
        without = {"fps": fps, "ms": ms, "stages_ms": split}
    mib = 1 / (1 << 20)
    return BenchResult(
        model=model or str(backend.path), backend=backend.name, source=source.spec, live=source.live,
        frames=stats.measured_frames, warmup=warmup, pipeline=stats.to_dict(), raw_fps=raw_fps, raw_ms=raw_ms,
        raw_stages_ms=raw_split, raw_call=call_name, raw_without_graph=without, peak_rss_mib=peak_rss_bytes() * mib,
        rss_warm_mib=probe.warm * mib if probe.warm else None, rss_end_mib=probe.last * mib if probe.last else None,
    )
