"""Capture, inference and output in three threads joined by bounded queues.

    capture thread --[slot or queue]--> inference thread --[queue]--> output thread
    source.read()                        Segmenter(frame)             render + sinks

What travels is a FrameResult, filled in stage by stage. Live sources hand over through a
one-frame slot (sources.LatestSlot) that keeps only the newest frame (the older one is
dropped and counted: latency first). Files and folders go through a bounded FIFO
queue whose ``put`` blocks, so no frame is lost and order is kept. The main thread only
waits, shows progress and turns Ctrl-C / SIGTERM into a clean stop: sources stop, what is in
flight is written, sinks are closed (a video is finalised and playable).
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .metadata import ModelMeta
from .postprocess import palette_bgr
from .segmenter import Segmenter
from .sinks import Sink
from .sources import LatestSlot, Source
from .view import ViewSettings

log = logging.getLogger("dilseg.pipeline")

STAGES = ("capture", "preprocess", "infer", "postprocess", "render", "write")
_END = object()  # end-of-stream marker passed down the queues


class StageTimes:
    """Timings of one stage in a preallocated ring (memory stays flat however long the run);
    percentiles cover the most recent ``capacity`` frames, count and mean cover all of them."""

    def __init__(self, capacity: int = 10000) -> None:
        self.ring = np.zeros(capacity, np.float64)
        self.count = 0
        self.total = 0.0

    def add(self, ms: float) -> None:
        self.ring[self.count % len(self.ring)] = ms
        self.count += 1
        self.total += ms

    def values(self) -> np.ndarray:
        return self.ring[: min(self.count, len(self.ring))]

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.values(), q)) if self.count else float("nan")

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


@dataclass
class PipelineStats:
    """What a run did and how long each stage took (milliseconds)."""

    frames_in: int = 0  # frames read from the source
    frames_out: int = 0  # frames through every sink (after warm-up too)
    dropped: int = 0  # live frames replaced by a newer one before inference took them
    corrupt_skipped: int = 0  # frames that failed to decode and were skipped
    reopens: int = 0  # live source reconnects
    warmup: int = 0  # first frames left out of timings and FPS
    stopped_by: str = ""  # "", "max-frames", "SIGINT", "SIGTERM", "window", "stop()", "error", "source lost",
    # or the reason a caller gave stop()
    stages: dict[str, StageTimes] = field(default_factory=dict)
    started: float = 0.0  # perf_counter when timing started (pipeline start, or end of warm-up)
    finished: float = 0.0  # perf_counter of the last frame out

    def add(self, name: str, ms: float) -> None:
        if name not in self.stages:
            self.stages[name] = StageTimes()
        self.stages[name].add(ms)

    @property
    def measured_frames(self) -> int:
        return max(0, self.frames_out - self.warmup)

    @property
    def seconds(self) -> float:
        return max(0.0, self.finished - self.started)

    @property
    def fps(self) -> float:
        """End-to-end throughput: frames out per second of wall time (after warm-up)."""
        return self.measured_frames / self.seconds if self.seconds > 0 else 0.0

    def percentiles(self) -> dict[str, dict[str, float]]:
        """{stage: {p50, p95, mean, n}} in pipeline order, backend-reported stages after them."""
        order = [s for s in STAGES if s in self.stages] + [s for s in self.stages if s not in STAGES]
        return {s: {"p50": self.stages[s].percentile(50), "p95": self.stages[s].percentile(95),
                    "mean": self.stages[s].mean, "n": self.stages[s].count} for s in order}

    def to_dict(self) -> dict:
        return {"frames_in": self.frames_in, "frames_out": self.frames_out, "dropped": self.dropped,
                "corrupt_skipped": self.corrupt_skipped, "reopens": self.reopens, "warmup": self.warmup,
                "fps": self.fps, "seconds": self.seconds, "stopped_by": self.stopped_by,
                "stages_ms": self.percentiles()}

    def summary(self) -> str:
        lines = [f"{'stage':<14}{'p50 ms':>9}{'p95 ms':>9}{'mean ms':>9}"]
        for name, p in self.percentiles().items():
            lines.append(f"{name:<14}{p['p50']:>9.2f}{p['p95']:>9.2f}{p['mean']:>9.2f}")
        lines.append(f"frames in {self.frames_in}, out {self.frames_out}, dropped {self.dropped}, "
                     f"corrupt skipped {self.corrupt_skipped}, reopens {self.reopens}")
        lines.append(f"end-to-end {self.fps:.1f} FPS over {self.measured_frames} frames in {self.seconds:.1f}s"
                     + (f" (after {self.warmup} warm-up frames)" if self.warmup else "")
                     + (f"; stopped by {self.stopped_by}" if self.stopped_by else ""))
        return "\n".join(lines)


@dataclass
class FrameResult:
    """One frame through the pipeline: what travels down the queues, filled in stage by stage
    (labels by inference, rendered by the output stage), and what ``on_result`` and
    ``Sink.write_result`` receive."""

    index: int  # running number of the frame as captured (gaps = dropped frames)
    name: str  # the source's name for it (file stem or index)
    frame: np.ndarray
    captured_at: float  # perf_counter when the frame was read
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds per stage
    labels: np.ndarray | None = None  # HxW uint8 class ids at frame size
    meta: ModelMeta | None = None  # the model that made ``labels``
    rendered: np.ndarray | None = None  # the picture of the pipeline's view (None without one)
    batch: int | None = None  # the shared inference it ran in (several streams through one backend)


class Pipeline:
    """source -> Segmenter -> render -> sinks, in three threads. ``run()`` returns PipelineStats.

    ``view`` says what the output stage draws for the sinks (None: nothing; sinks that draw
    for themselves, such as a web page's publisher, get ``rendered=None``). ``max_frames``
    bounds the frames processed; ``warmup`` frames are processed but left out of the timings
    and FPS (benchmarks). ``on_result`` is called in the output thread per frame. ``progress``:
    True shows a progress bar; a callable ``progress(done, total)`` is called from the thread
    that called ``run()`` (a UI's own thread) as frames come out, a few times a second.
    Signals are handled only when ``run()`` is called from the main thread.

    ``segmenter`` and ``view`` are plain attributes read once per frame: assigning another
    model or view while it runs takes effect from the next frame.
    """

    def __init__(self, source: Source, segmenter: Segmenter, sinks: Sequence[Sink] = (), *,
                 view: ViewSettings | None = ViewSettings(), max_frames: int | None = None, warmup: int = 0,
                 queue_size: int = 4, on_result: Callable[[FrameResult], None] | None = None,
                 progress: bool | Callable[[int, int | None], None] = False, handle_signals: bool = True) -> None:
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.source, self.segmenter, self.sinks = source, segmenter, list(sinks)
        self.view = view
        self._luts: dict[tuple, np.ndarray] = {}
        self.max_frames, self.warmup = max_frames, warmup
        self.on_result, self.progress, self.handle_signals = on_result, progress, handle_signals
        self.live = source.live
        self.frames_q = LatestSlot() if self.live else queue.Queue(maxsize=queue_size)
        # Live: a one-deep hand-off, so a slow output pushes back on inference (which then takes
        # the newest frame) instead of building a backlog of stale results.
        self.results_q: queue.Queue = queue.Queue(maxsize=1 if self.live else queue_size)
        self.stop_event = threading.Event()
        self.stats = PipelineStats(warmup=warmup)
        self.errors: list[BaseException] = []
        self.failed_sinks: list[Sink] = []  # sinks whose write or close failed (their output is absent)
        self.kept: list[Sink] = []  # sinks closed complete at the end (after an error too)
        self._lock = threading.Lock()
        self.captured = threading.Event()  # the capture thread has finished
        self.inferred = threading.Event()  # the inference thread has finished

    @property
    def meta(self) -> ModelMeta:
        return self.segmenter.meta

    # ------------------------------------------------------------------ control

    def stop(self, reason: str = "stop()") -> None:
        """Ask every stage to finish; safe from any thread and from signal handlers."""
        if not self.stats.stopped_by:
            self.stats.stopped_by = reason
        self.stop_event.set()
        self.source.interrupt()

    def counters(self) -> dict[str, int]:
        """Frame counts so far, readable while it runs (the same names as ``PipelineStats``)."""
        return {"frames_in": self.stats.frames_in, "frames_out": self.stats.frames_out,
                "dropped": self.frames_q.dropped if isinstance(self.frames_q, LatestSlot) else 0,
                "corrupt_skipped": self.source.corrupt_frames, "reopens": self.source.reopens}

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self.errors.append(exc)
        self.stop("error")

    def _put(self, q, item) -> bool:
        """Blocking put that still notices a stop or an error (a FIFO may be full of frames
        nobody will take). The end marker is best effort: consumers also watch ``done``."""
        if isinstance(q, LatestSlot):
            if item is _END:
                q.end()
                return True
            return q.put(item)
        while True:
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                if self.errors or (self.stop_event.is_set() and (item is _END or q is self.frames_q)):
                    return False

    def _get(self, q, upstream_done: threading.Event):
        """The next item, or _END once the upstream stage has finished and nothing is left."""
        while True:
            try:
                item = q.get(timeout=0.1)
                return _END if item is None else item  # None: a LatestSlot that has ended
            except queue.Empty:
                if self.errors or upstream_done.is_set():
                    try:  # an item may have landed between the timeout and the check
                        item = q.get_nowait() if not isinstance(q, LatestSlot) else q.get(timeout=0)
                    except queue.Empty:
                        return _END
                    return _END if item is None else item

    def _wait_for_room(self, q: queue.Queue) -> None:
        """Live: take a frame only once its result can be handed on at once; a frame taken
        earlier would age while waiting, and the newer one the camera delivers meanwhile would
        be the better choice."""
        while q.full() and not self.stop_event.is_set() and not self.errors:
            time.sleep(0.002)  # short polls: the wait is about one output period

    def _lut(self, meta: ModelMeta, view: ViewSettings) -> np.ndarray:
        key = (id(meta), view.visible)
        lut = self._luts.get(key)
        if lut is None:
            if len(self._luts) > 16:  # models and class choices changed often: start afresh
                self._luts.clear()
            lut = self._luts[key] = palette_bgr(meta, view.visible_list)
        return lut

    # ------------------------------------------------------------------ stages

    def _capture(self) -> None:
        index = 0
        try:
            while not self.stop_event.is_set():
                if not self.live and self.max_frames is not None and index >= self.max_frames:
                    break
                t0 = time.perf_counter()
                frame = self.source.read()
                t1 = time.perf_counter()
                if frame is None:
                    if self.source.lost:
                        self.stop("source lost")
                    break
                self.stats.frames_in += 1
                item = FrameResult(index, self.source.name or f"{index:06d}", frame, t1,
                                   {"capture": (t1 - t0) * 1e3})
                index += 1
                if not self._put(self.frames_q, item):
                    break
        except BaseException as exc:  # noqa: BLE001 - reported by run()
            self._fail(exc)
        finally:
            self.captured.set()
            self._put(self.frames_q, _END)

    def _infer(self) -> None:
        taken = 0
        try:
            while True:
                if self.live:
                    self._wait_for_room(self.results_q)
                item = self._get(self.frames_q, self.captured)
                if item is _END or self.errors:
                    break
                if self.stop_event.is_set() and self.stats.stopped_by not in ("", "max-frames"):
                    # Interrupted: frames still queued are not worth another inference.
                    continue
                segmenter = self.segmenter  # read once: a model swapped meanwhile applies to the next frame
                seg = segmenter(item.frame)
                item.labels, item.meta, item.batch = seg.labels, segmenter.meta, seg.batch
                item.timings.update(seg.timings)
                if not self._put(self.results_q, item):
                    break
                taken += 1
                if self.max_frames is not None and taken >= self.max_frames:
                    self.stop("max-frames")
                    break
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)
        finally:
            self.inferred.set()
            self._put(self.results_q, _END)

    def _output(self) -> None:
        stats = self.stats
        try:
            while True:
                result = self._get(self.results_q, self.inferred)
                if result is _END or self.errors:
                    break
                timings = result.timings
                view = self.view  # read once per frame: a view changed meanwhile applies to the next
                t0 = time.perf_counter()
                if view is not None:
                    result.rendered = view.render(result.frame, result.labels, result.meta,
                                                  self._lut(result.meta, view))
                t1 = time.perf_counter()
                drawn = timings["render"] = (t1 - t0) * 1e3
                for sink in self.sinks:
                    try:
                        sink.write_result(result)
                    except BaseException:
                        self.failed_sinks.append(sink)  # aborted at the end; the others are finalised
                        raise
                t2 = time.perf_counter()
                # Sinks that draw for themselves added their drawing time to "render".
                timings["write"] = (t2 - t1) * 1e3 - (timings["render"] - drawn)
                timings["latency"] = (t2 - result.captured_at) * 1e3
                stats.frames_out += 1
                if stats.frames_out > self.warmup:
                    for key, ms in timings.items():
                        stats.add(key, ms)
                    stats.finished = t2
                elif stats.frames_out == self.warmup:
                    stats.started = t2  # the FPS clock starts when warm-up ends
                if self.on_result is not None:
                    self.on_result(result)
                if any(s.quit_requested for s in self.sinks):
                    self.stop("window")
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)

    # ------------------------------------------------------------------ run

    def _install_signals(self) -> dict:
        return stop_on_signals(self.stop) if self.handle_signals else {}

    def run(self) -> PipelineStats:
        previous = self._install_signals()
        threads = [threading.Thread(target=fn, name=f"dilseg-{fn.__name__.strip('_')}", daemon=True)
                   for fn in (self._capture, self._infer, self._output)]
        self.stats.started = time.perf_counter()
        bar = self._progress_bar()
        try:
            for t in threads:
                t.start()
            done = 0
            while any(t.is_alive() for t in threads):
                threads[-1].join(timeout=0.2)
                if bar is not None and self.stats.frames_out != done:
                    bar.update(self.stats.frames_out - done)
                    done = self.stats.frames_out
                elif callable(self.progress) and self.stats.frames_out != done:
                    done = self.stats.frames_out
                    self.progress(done, self._total())
        finally:
            self.stop_event.set()
            self.source.interrupt()
            for t in threads:
                t.join(timeout=5.0)
            if bar is not None:
                bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            # A stop (even a second Ctrl-C) or an error finalises the outputs with the frames they got;
            # only a sink that failed discards its own.
            self._close_sinks()
            counts = self.counters()
            self.stats.dropped, self.stats.corrupt_skipped, self.stats.reopens = (
                counts["dropped"], counts["corrupt_skipped"], counts["reopens"])
            if not self.stats.finished:
                self.stats.finished = time.perf_counter() if self.stats.measured_frames else self.stats.started
        if self.errors:
            raise self.errors[0]
        return self.stats

    def _close_sinks(self) -> None:
        first: BaseException | None = None
        for sink in self.sinks:
            try:
                if sink in self.failed_sinks:
                    sink.abort()
                else:
                    sink.close()
                    self.kept.append(sink)
            except BaseException as exc:  # noqa: BLE001 - close every sink, report the first failure
                self.failed_sinks.append(sink)
                first = first or exc
        if first is not None and not self.errors:
            self.errors.append(first)

    def _total(self) -> int | None:
        """Frames this run will make, when known."""
        total = self.max_frames
        if not self.live and self.source.frame_count:
            total = min(total or self.source.frame_count, self.source.frame_count)
        return total

    def _progress_bar(self):
        if self.progress is not True:
            return None  # off, or a callable told in the calling thread
        from tqdm import tqdm

        return tqdm(total=self._total(), unit="frame", desc="segmenting", dynamic_ncols=True, leave=False)


def stop_on_signals(stop: Callable[[str], None]) -> dict:
    """Turn SIGINT/SIGTERM into ``stop(signal name)`` while a run lasts; returns the previous
    handlers for ``signal.signal`` to put back. Only in the main thread (elsewhere: {})."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    first: list[float] = []

    def handler(signum, _frame):
        name = signal.Signals(signum).name
        if first:
            # A second signal a moment later (a second Ctrl-C) stops waiting for the stages;
            # one within a second is the same request delivered twice (e.g. `timeout` sends
            # to the process and to its group).
            if time.monotonic() - first[0] > 1.0:
                raise KeyboardInterrupt
            return
        first.append(time.monotonic())
        log.warning("%s received: stopping; finishing the frames in flight and closing outputs "
                    "(again to stop at once)", name)
        stop(name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # not allowed here (embedded interpreters)
            pass
    return previous
