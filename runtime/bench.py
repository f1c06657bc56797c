"""`dilseg bench`: the pipeline's per-stage latency and end-to-end FPS next to the raw inference
throughput of the same model on the same input, so the pipeline's overhead is visible."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    peak_rss_mib: float = 0.0
    rss_warm_mib: float | None = None
    rss_end_mib: float | None = None

    @property
    def e2e_fps(self) -> float:
        return self.pipeline["fps"]

    @property
    def ratio(self) -> float:
        return self.e2e_fps / self.raw_fps if self.raw_fps else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "e2e_fps": self.e2e_fps, "ratio": self.ratio}

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
        lines += [
            "",
            f"frames: {p['frames_out'] - p['warmup']} measured after {p['warmup']} warm-up; "
            f"dropped {p['dropped']}, corrupt skipped {p['corrupt_skipped']}",
            f"end-to-end FPS:     {self.e2e_fps:8.1f}   (source -> sinks, all threads)",
            f"raw inference FPS:  {self.raw_fps:8.1f}   (back-to-back backend.infer, same model, same input)",
            f"end-to-end / raw:   {self.ratio:8.2f}",
            f"peak RSS:           {self.peak_rss_mib:8.1f} MiB"
            + (f"   (warm {self.rss_warm_mib:.1f} MiB, end {self.rss_end_mib:.1f} MiB)"
               if self.rss_warm_mib is not None and self.rss_end_mib is not None else ""),
        ]
        return "\n".join(lines)

    def write_json(self, path: str | Path) -> None:
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2, default=float).encode())


def _summary(times: StageTimes) -> dict:
    return {"p50": times.percentile(50), "p95": times.percentile(95), "mean": times.mean, "n": times.count}


def raw_inference(backend: Backend, tensor: np.ndarray, frames: int, warmup: int) -> tuple[float, dict, dict]:
    """Back-to-back ``backend.infer`` on one tensor: (FPS, {p50,p95,mean} ms of the call's wall time,
    the backend's own split where it reports one)."""
    for _ in range(warmup):
        backend.infer(tensor)
    total, split = StageTimes(max(frames, 1)), {}
    own = backend.capabilities.stage_timings
    t_start = time.perf_counter()
    for _ in range(frames):
        t0 = time.perf_counter()
        backend.infer(tensor)
        total.add((time.perf_counter() - t0) * 1e3)
        for key, ms in (backend.last_timings.items() if own else ()):
            split.setdefault(key, StageTimes(max(frames, 1))).add(ms)
    seconds = time.perf_counter() - t_start
    return frames / seconds if seconds > 0 else 0.0, _summary(total), {k: _summary(v) for k, v in split.items()}


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
    tensor = preprocess(last["frame"], backend.meta)
    raw_fps, raw_ms, raw_split = raw_inference(backend, tensor, max(1, stats.measured_frames or frames), min(warmup, 10))
    mib = 1 / (1 << 20)
    return BenchResult(
        model=model or str(backend.path), backend=backend.name, source=source.spec, live=source.live,
        frames=stats.measured_frames, warmup=warmup, pipeline=stats.to_dict(), raw_fps=raw_fps, raw_ms=raw_ms,
        raw_stages_ms=raw_split, peak_rss_mib=peak_rss_bytes() * mib,
        rss_warm_mib=probe.warm * mib if probe.warm else None, rss_end_mib=probe.last * mib if probe.last else None,
    )
