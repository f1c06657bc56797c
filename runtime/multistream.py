"""Several sources through one loaded backend: one Pipeline per stream, one Batcher between them.

    stream 0: capture -> preprocess --\\                    /--> postprocess -> render -> sinks 0
    stream 1: capture -> preprocess ---+--> Batcher: one --+---> postprocess -> render -> sinks 1
    ...                                     backend.infer         ...
                                                 \\--> Mosaic (optional): the streams tiled, one picture per batch

Each stream is the Pipeline `dilseg run` uses for one source, so every stream keeps its own
policy (live: the newest frame, drops counted; files: every frame, in order), its own sinks,
reconnects and stats, and a stream that drops or ends leaves the others running. What they
share is the backend, through the Batcher (runtime/batching.py), which runs at most one frame
per stream per inference.
"""

from __future__ import annotations

import math
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np

from .backends.base import Backend
from .batching import Batcher, BatchStats, frame_waiting
from .errors import DilsegError
from .pipeline import FrameResult, Pipeline, PipelineStats, stop_on_signals
from .sinks import Sink
from .sources import Source
from .view import ViewSettings

STREAM_KEY = "{i}"  # in an output name: the stream's number (out_{i}.mp4 -> out_0.mp4, out_1.mp4, ...)
MOSAIC_PENDING = 64  # batches a mosaic holds back for a late tile before it draws without it


class StreamFailed(DilsegError, RuntimeError):
    """One stream of a multi-stream run failed (the others ran to their end)."""


def stream_path(template: str, index: int) -> str:
    """``out_{i}.mp4`` -> ``out_3.mp4`` for stream 3."""
    return template.replace(STREAM_KEY, str(index))


# --------------------------------------------------------------------------- mosaic


class Mosaic:
    """The streams' pictures tiled in a grid (stream 0 top left, row by row), one picture per
    batch the streams ran in, written to ``sinks`` by its own thread (a window wants one).

    Each stream's Pipeline gets ``tile_sink(i)``; the Batcher tells ``on_batch`` which streams a
    batch holds. A picture is drawn once every stream of its batch has delivered its tile, in
    batch order, so a file's every frame appears once; a stream that has no frame in a batch
    shows its previous one. Tiles have the size of the first picture (``tile`` to choose).
    """

    def __init__(self, sinks: Sequence[Sink], count: int, tile: tuple[int, int] | None = None,
                 titles: Sequence[str] | None = None, queue_size: int = 8) -> None:
        self.sinks, self.count = list(sinks), count
        self.cols = math.ceil(math.sqrt(count))
        self.rows = math.ceil(count / self.cols)
        self.tile = tile  # (width, height)
        self.titles = list(titles) if titles is not None else [str(i) for i in range(count)]
        self.frames = 0  # pictures written
        self.error: BaseException | None = None
        self._shown: list[np.ndarray | None] = [None] * count
        self._ended: set[int] = set()
        self._order: list[int] = []  # batches not drawn yet, oldest first
        self._missing: dict[int, set[int]] = {}  # batch -> streams whose tile has not come
        self._tiles: dict[int, dict[int, np.ndarray]] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._writer = threading.Thread(target=self._write, name="dilseg-mosaic", daemon=True)
        self._writer.start()

    @property
    def spec(self) -> str:
        return "mosaic:" + ", ".join(s.spec for s in self.sinks)

    def tile_sink(self, index: int) -> Sink:
        return _TileSink(self, index)

    def on_batch(self, batch: int, streams: Sequence[int]) -> None:
        with self._lock:
            self._order.append(batch)
            self._missing[batch] = set(streams) - self._ended
            self._tiles[batch] = {}
            self._flush()

    def _put_tile(self, index: int, batch: int | None, picture: np.ndarray) -> None:
        with self._lock:
            if batch in self._missing:
                self._tiles[batch][index] = picture
                self._missing[batch].discard(index)
            else:  # not from a batch this mosaic was told about: shown from the next picture on
                self._shown[index] = picture
            self._flush()

    def _stream_ended(self, index: int) -> None:
        with self._lock:
            self._ended.add(index)
            for missing in self._missing.values():
                missing.discard(index)
            self._flush()

    def _flush(self, everything: bool = False) -> None:
        """Draw the batches that are complete, oldest first (under the lock)."""
        while self._order:
            batch = self._order[0]
            if self._missing[batch] and not everything and len(self._order) <= MOSAIC_PENDING:
                return
            self._order.pop(0)
            del self._missing[batch]
            for index, picture in self._tiles.pop(batch).items():
                self._shown[index] = picture
            if any(p is not None for p in self._shown):
                self._send(self.compose())

    def compose(self) -> np.ndarray:
        """The grid of what each stream shows now (black where a stream has shown nothing yet)."""
        if self.tile is None:
            first = next(p for p in self._shown if p is not None)
            self.tile = (first.shape[1], first.shape[0])
        w, h = self.tile
        canvas = np.zeros((self.rows * h, self.cols * w, 3), np.uint8)
        for i, picture in enumerate(self._shown):
            if picture is None:
                continue
            if (picture.shape[1], picture.shape[0]) != (w, h):
                picture = cv2.resize(picture, (w, h), interpolation=cv2.INTER_AREA)
            y, x = (i // self.cols) * h, (i % self.cols) * w
            canvas[y:y + h, x:x + w] = picture
            cv2.putText(canvas, self.titles[i], (x + 6, y + h - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1,
                        cv2.LINE_AA)
        return canvas

    def _send(self, picture: np.ndarray) -> None:
        while self.error is None:
            try:
                self._queue.put(picture, timeout=0.1)
                return
            except queue.Full:
                continue

    def _write(self) -> None:
        while (picture := self._queue.get()) is not None:
            if self.error is not None:
                continue  # drain, so no stream waits on a writer that failed
            try:
                for sink in self.sinks:
                    sink.write(picture, None, picture, name=f"{self.frames:06d}")
                self.frames += 1
            except BaseException as exc:  # noqa: BLE001 - reported by close()
                self.error = exc

    @property
    def quit_requested(self) -> bool:
        return any(s.quit_requested for s in self.sinks)

    def close(self, ok: bool = True) -> None:
        """Draw what is left, finish writing, close the sinks (``ok`` False: discard them)."""
        with self._lock:
            self._flush(everything=True)
        self._queue.put(None)
        self._writer.join()
        first: BaseException | None = None
        for sink in self.sinks:
            try:
                sink.close() if ok and self.error is None else sink.abort()
            except BaseException as exc:  # noqa: BLE001 - close every sink, report the first failure
                first = first or exc
        if self.error is not None:
            raise self.error
        if first is not None:
            raise first


class _TileSink(Sink):
    """Stream ``index``'s way into a Mosaic."""

    def __init__(self, mosaic: Mosaic, index: int) -> None:
        self.mosaic, self.index = mosaic, index
        self.spec = f"mosaic tile {index}"

    def write_result(self, result: FrameResult) -> None:
        if result.rendered is None:
            raise ValueError("a mosaic needs rendered pictures: run the streams with a view")
        self.mosaic._put_tile(self.index, result.batch, result.rendered)

    @property
    def quit_requested(self) -> bool:  # type: ignore[override]
        return self.mosaic.quit_requested

    def close(self) -> None:
        self.mosaic._stream_ended(self.index)


# --------------------------------------------------------------------------- the run


@dataclass
class StreamReport:
    index: int
    spec: str
    live: bool
    stats: PipelineStats
    error: BaseException | None = None
    sinks: list[Sink] = field(default_factory=list)

    def to_dict(self) -> dict:
        lat = self.stats.stages.get("latency")
        return {"stream": self.index, "source": self.spec, "live": self.live, **self.stats.to_dict(),
                "latency_ms": {"p50": lat.percentile(50), "p95": lat.percentile(95)} if lat else None,
                "error": str(self.error) if self.error else None}


@dataclass
class MultiStreamStats:
    streams: list[StreamReport]
    batches: BatchStats
    batching: str  # how the backend was shared, in words
    backend_counts: dict  # Backend.counts: calls and frames through infer
    stopped_by: str = ""
    mosaic_frames: int | None = None

    @property
    def aggregate_fps(self) -> float:
        """Frames per second of all streams together (each measured over its own run)."""
        return sum(s.stats.fps for s in self.streams)

    @property
    def fps_spread(self) -> float:
        """(fastest - slowest) / fastest per-stream FPS: 0 when every stream got the same rate."""
        rates = [s.stats.fps for s in self.streams]
        return (max(rates) - min(rates)) / max(rates) if rates and max(rates) > 0 else 0.0

    @property
    def errors(self) -> list[StreamReport]:
        return [s for s in self.streams if s.error is not None]

    def to_dict(self) -> dict:
        return {"streams": [s.to_dict() for s in self.streams], "aggregate_fps": self.aggregate_fps,
                "fps_spread": self.fps_spread, "batching": self.batching, "batches": self.batches.to_dict(),
                "backend_counts": self.backend_counts, "stopped_by": self.stopped_by,
                "mosaic_frames": self.mosaic_frames}

    def summary(self) -> str:
        head = (f"{'stream':<7}{'source':<28}{'out':>7}{'FPS':>8}{'lat p50':>9}{'lat p95':>9}{'dropped':>9}"
                f"{'corrupt':>9}{'reopens':>9}  end")
        lines = [head]
        for s in self.streams:
            st, lat = s.stats, s.stats.stages.get("latency")
            p50, p95 = (lat.percentile(50), lat.percentile(95)) if lat else (float("nan"),) * 2
            spec = s.spec if len(s.spec) <= 27 else s.spec[:24] + "..."
            end = f"error: {s.error}" if s.error else (st.stopped_by or "end of source")
            lines.append(f"{s.index:<7}{spec:<28}{st.frames_out:>7}{st.fps:>8.1f}{p50:>9.1f}{p95:>9.1f}"
                         f"{st.dropped:>9}{st.corrupt_skipped:>9}{st.reopens:>9}  {end}")
        b = self.batches
        lines.append(f"aggregate {self.aggregate_fps:.1f} FPS over {len(self.streams)} streams (per-stream FPS "
                     f"spread {self.fps_spread * 100:.0f}%); latency in ms, capture to written")
        sizes = ", ".join(f"{n}x{k}" for k, n in sorted(b.sizes.items()))
        lines.append(f"backend: {self.batching}; {b.batches} inferences of {b.frames} frames, mean batch "
                     f"{b.mean_size:.2f} ({sizes or 'none'}), infer per batch p50 {b.infer.percentile(50):.1f} ms "
                     f"p95 {b.infer.percentile(95):.1f} ms" + (f", {b.padded} padding copies" if b.padded else ""))
        if self.mosaic_frames is not None:
            lines.append(f"mosaic: {self.mosaic_frames} pictures")
        return "\n".join(lines)


class MultiStream:
    """N sources -> one backend -> per-stream sinks (and a Mosaic). ``run()`` returns
    MultiStreamStats once every stream has ended (its source ended, was lost, or ``max_frames``
    reached), or on ``stop()`` / Ctrl-C / SIGTERM, which end every stream cleanly.

    ``sinks[i]`` are stream i's sinks. ``max_frames`` and ``warmup`` apply to each stream;
    ``max_batch``, ``max_wait_ms`` and ``instances`` go to the Batcher. ``on_result(i, result)`` is called
    from stream i's output thread. A stream that fails (its sink cannot write, its model call
    raises) is reported in its StreamReport; the others go on.
    """

    def __init__(self, sources: Sequence[Source], backend: Backend, sinks: Sequence[Sequence[Sink]] | None = None, *,
                 view: ViewSettings | None = ViewSettings(), mosaic: Mosaic | None = None,
                 max_frames: int | None = None, warmup: int = 0, max_batch: int | None = None,
                 max_wait_ms: float | None = None, instances: int = 1, queue_size: int = 4,
                 on_result: Callable[[int, FrameResult], None] | None = None, progress: bool = False,
                 handle_signals: bool = True) -> None:
        if not sources:
            raise ValueError("a multi-stream run needs at least one source")
        if sinks is not None and len(sinks) != len(sources):
            raise ValueError(f"{len(sources)} sources but sinks for {len(sinks)}")
        if mosaic is not None and view is None:
            raise ValueError("a mosaic needs a view to draw the streams with")
        self.sources, self.backend, self.mosaic = list(sources), backend, mosaic
        self.sinks = [list(s) for s in sinks] if sinks is not None else [[] for _ in sources]
        self.progress, self.handle_signals = progress, handle_signals
        self.stopped_by = ""
        self.batcher = Batcher(backend, max_batch, max_wait_ms, instances)
        index_of: dict[int, int] = {}
        self.pipelines: list[Pipeline] = []
        for i, source in enumerate(self.sources):
            segmenter = self.batcher.stream(f"stream {i}")
            index_of[id(segmenter)] = i
            stream_sinks = self.sinks[i] + ([mosaic.tile_sink(i)] if mosaic is not None else [])
            callback = None if on_result is None else (lambda result, i=i: on_result(i, result))
            pipeline = Pipeline(source, segmenter, stream_sinks, view=view, max_frames=max_frames, warmup=warmup,
                                queue_size=queue_size, on_result=callback, handle_signals=False)
            segmenter.waiting = lambda p=pipeline: frame_waiting(p)
            self.pipelines.append(pipeline)
        if mosaic is not None:
            self.batcher.listeners.append(
                lambda batch, streams: mosaic.on_batch(batch, [index_of[id(s)] for s in streams]))

    def stop(self, reason: str = "stop()") -> None:
        """End every stream (safe from any thread and from signal handlers)."""
        if not self.stopped_by:
            self.stopped_by = reason
        for pipeline in self.pipelines:
            pipeline.stop(reason)

    def run(self) -> MultiStreamStats:
        reports = [StreamReport(i, s.spec, s.live, p.stats, sinks=self.sinks[i])
                   for i, (s, p) in enumerate(zip(self.sources, self.pipelines))]

        def run_stream(i: int) -> None:
            pipeline = self.pipelines[i]
            try:
                reports[i].stats = pipeline.run()
            except BaseException as exc:  # noqa: BLE001 - reported per stream; the others go on
                reports[i].error = exc
            finally:
                pipeline.segmenter.close()  # batches stop waiting for this stream

        previous = stop_on_signals(self.stop) if self.handle_signals else {}
        threads = [threading.Thread(target=run_stream, args=(i,), name=f"dilseg-stream-{i}", daemon=True)
                   for i in range(len(self.pipelines))]
        bar = self._progress_bar()
        mosaic_error: BaseException | None = None
        try:
            for t in threads:
                t.start()
            done = 0
            while any(t.is_alive() for t in threads):
                threads[0].join(timeout=0.2) if threads[0].is_alive() else time.sleep(0.05)
                out = sum(p.stats.frames_out for p in self.pipelines)
                if bar is not None and out != done:
                    bar.update(out - done)
                    done = out
        finally:
            if any(t.is_alive() for t in threads):  # a second Ctrl-C: stop waiting, still close what is open
                self.stop("SIGINT")
            for t in threads:
                t.join(timeout=10)
            self.batcher.close()
            if bar is not None:
                bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.mosaic is not None:
                try:
                    self.mosaic.close(ok=not any(r.error for r in reports))
                except BaseException as exc:  # noqa: BLE001 - reported after the streams' results
                    mosaic_error = exc
        stats = MultiStreamStats(reports, self.batcher.stats, self.batcher.describe(), self.backend.counts.to_dict(),
                                 self.stopped_by, self.mosaic.frames if self.mosaic is not None else None)
        if mosaic_error is not None:
            raise mosaic_error
        return stats

    def _progress_bar(self):
        if not self.progress:
            return None
        from tqdm import tqdm

        totals = []
        for source, pipeline in zip(self.sources, self.pipelines):
            known = [n for n in (pipeline.max_frames, None if source.live else source.frame_count) if n]
            totals.append(min(known) if known else None)
        total = sum(totals) if all(t is not None for t in totals) else None
        return tqdm(total=total, unit="frame", desc=f"segmenting {len(self.sources)} streams", dynamic_ncols=True,
                    leave=False)
