"""One loaded backend shared by several streams, their frames run together as one batch.

Each stream keeps its own Pipeline (capture, newest-frame or no-loss policy, sinks, stats,
reconnects); what it is given as its segmenter is a ``StreamSegmenter`` of one ``Batcher``.
A stream's inference thread preprocesses its frame, hands the tensor over and waits; the
batcher's thread stacks what the streams have handed over into one ``backend.infer`` and hands
each stream its slice back, which the stream postprocesses itself::

    batcher = Batcher(backend)
    pipelines = [Pipeline(src, batcher.stream(f"stream {i}"), sinks) for i, src in enumerate(sources)]

Fairness comes from the hand-over: a stream waits for its frame's result before it offers the
next, so every batch holds at most one frame per stream, and a stream waits at most for the
batch in progress, however fast the others are. A batch starts as soon as every stream that
has a frame to offer has offered it (``expected``), or ``max_wait_ms`` after the first one:
streams whose camera has nothing new are not waited for.

The batch size is what the artifact takes (``Backend.batch_range``): any for a free batch axis,
up to the engine profile's largest for TensorRT, exactly N for a graph fixed at N (a shorter
batch is padded with copies of its last frame). A graph fixed at one frame runs the streams'
frames one after another, in the same fair order, through the same backend.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .backends.base import Backend, BackendError
from .pipeline import Pipeline, StageTimes
from .postprocess import postprocess
from .preprocess import preprocess
from .segmenter import Segmentation, Segmenter
from .sources import LatestSlot

log = logging.getLogger("dilseg.batching")

# How long a batch waits for a stream that has a frame ready but has not offered it yet, unless
# told (max_wait_ms): twice the time such a stream has taken to offer its frame after its last
# result (its hand-over and preprocessing, measured per stream), within these bounds. A stream
# later than that is busy elsewhere (writing its outputs), and waiting on would delay the others.
# The floor is the interpreter's thread switch interval: a stream's thread that was just woken
# may wait that long for the GIL before it runs at all.
AUTO_WAIT_FACTOR = 2.0
AUTO_WAIT_MS = (sys.getswitchinterval() * 1e3, 50.0)


def concurrent_infer(backend: Backend) -> bool:
    """Whether several threads may call ``backend.infer`` at once (``--instances``), as the
    backend declares in its capabilities."""
    return backend.capabilities.concurrent_infer


def default_instances(backend: Backend, streams: int) -> int:
    """Batches at once unless --instances says: two where the backend runs a batch as parallel
    requests lent per call (OpenVINO's throughput hint) and there are more ``streams`` than one
    batch holds, so one batch's frames start as the other's requests come free instead of every
    request waiting for a batch's slowest frame (measured 1.1-1.3x the frames per second of one
    batch at a time at four streams: README, Many cameras); else one."""
    _, hi = backend.batch_range()
    return 2 if backend.parallel_batches() and hi is not None and hi < streams and concurrent_infer(backend) else 1


@dataclass(eq=False)
class _Request:
    stream: "StreamSegmenter"
    tensor: np.ndarray | None  # preprocessed 1xCxHxW, or None when the backend takes the frame itself
    frame: np.ndarray
    submitted: float
    done: threading.Event = field(default_factory=threading.Event)
    output: np.ndarray | None = None
    error: BaseException | None = None
    batch: int = -1
    size: int = 0
    started: float = 0.0
    infer_ms: float = 0.0
    own_preprocess_ms: float = 0.0  # of infer_ms, what a frame-input backend spent preprocessing

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor.shape if self.tensor is not None else self.frame.shape


@dataclass
class BatchStats:
    """The batches a Batcher ran: how many, their sizes, how long each inference took (ms)."""

    batches: int = 0
    frames: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches had it
    infer: StageTimes = field(default_factory=StageTimes)  # per batch
    padded: int = 0  # copies added to fill a graph fixed at a larger batch

    @property
    def mean_size(self) -> float:
        return self.frames / self.batches if self.batches else 0.0

    def to_dict(self) -> dict:
        return {"batches": self.batches, "frames": self.frames, "mean_size": self.mean_size,
                "sizes": {str(k): v for k, v in sorted(self.sizes.items())}, "padded": self.padded,
                "infer_ms_per_batch": {"p50": self.infer.percentile(50), "p95": self.infer.percentile(95),
                                       "mean": self.infer.mean}}


class Batcher:
    """Runs the frames that several streams hand over as batches on one backend.

    ``instances`` batches run at once (threads calling the one loaded backend, as Triton's
    instance_group count): on a CPU, two single-threaded inferences keep two cores busier than
    one two-threaded one, since each waits on its own memory traffic. The streams are then
    shared out: a batch holds at most a 1/``instances`` share of them.
    ``max_batch`` caps the batch (default: what the backend takes, else the number of streams);
    ``max_wait_ms`` bounds how long the first frame of a batch waits for the others (default:
    twice the time a stream takes to offer its next ready frame, 5 to 50 ms). ``close()``
    stops the threads (it does not close the backend, which the caller owns).
    """

    def __init__(self, backend: Backend, max_batch: int | None = None, max_wait_ms: float | None = None,
                 instances: int = 1) -> None:
        if instances < 1:
            raise BackendError(f"--instances {instances}: must be 1 or more")
        if instances > 1 and not concurrent_infer(backend):
            raise BackendError(f"--instances {instances}: the {backend.label} backend runs one inference call at a "
                               "time; leave --instances out")
        lo, hi = backend.batch_range()
        if max_batch is not None:
            if max_batch < 1:
                raise BackendError(f"--max-batch {max_batch}: must be 1 or more")
            if hi is not None and max_batch > hi:
                raise BackendError(f"--max-batch {max_batch}: {backend.path.name} takes at most {hi} frames per "
                                   "inference" + ("; free its batch axis with `dilseg export onnx --from "
                                                  f"{backend.path.name} --batch dynamic`" if hi == 1 else
                                                  "; rebuild the engine with a larger --max batch"))
        self.backend, self.meta = backend, backend.meta
        caps = [x for x in (max_batch, hi) if x is not None]
        self.min_batch, self.limit = lo, min(caps) if caps else None  # limit None: one frame per stream
        # A backend that takes frames (preprocessing on the GPU, or inside its compiled graph)
        # keeps doing so where frames run one at a time, and for a batch where it runs several
        # frames at once itself (``infer_frames``: parallel requests of a graph fixed at one frame).
        self.frame_input = backend.capabilities.frame_input and (
            self.limit == 1 or (hi is not None and lo == 1 and backend.capabilities.frame_batches))
        self.max_wait_ms = max_wait_ms
        self.stats = BatchStats()
        self.listeners: list[Callable[[int, list["StreamSegmenter"]], None]] = []  # (batch, its streams)
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._streams: list[StreamSegmenter] = []
        self._closed = False
        self._inflight: set[int] = set()  # streams whose frame is in a batch now
        self._numbered = 0  # batches handed out (numbered in the order they start)
        self._stats_lock = threading.Lock()
        self.instances = instances
        self._threads = [threading.Thread(target=self._loop, name=f"dilseg-batcher-{k}", daemon=True)
                         for k in range(instances)]
        for thread in self._threads:
            thread.start()

    @property
    def batching(self) -> bool:
        """Whether frames of several streams can share one inference."""
        return self.limit is None or self.limit > 1

    def describe(self) -> str:
        at_once = f", {self.instances} at once" if self.instances > 1 else ""
        if not self.batching:
            return f"one frame per inference (the artifact's batch is fixed at 1){at_once}"
        if self.min_batch > 1:
            return f"batches of exactly {self.min_batch} (the artifact's fixed batch; short ones padded){at_once}"
        share = "one frame per stream" if self.instances == 1 else f"a 1/{self.instances} share of the streams"
        return f"batches of up to {self.limit if self.limit is not None else share}{at_once}"

    # -- streams -----------------------------------------------------------------------------

    def stream(self, name: str = "", expected: Callable[[], bool] | None = None) -> "StreamSegmenter":
        """A segmenter for one more stream. ``expected()`` says whether that stream has a frame
        waiting to be offered (a batch waits for it, up to ``max_wait_ms``)."""
        stream = StreamSegmenter(self, name or f"stream {len(self._streams)}", expected)
        with self._cond:
            if self._closed:
                raise BackendError("the batcher is closed")
            self._streams.append(stream)
        return stream

    def leave(self, stream: "StreamSegmenter") -> None:
        """``stream`` offers no more frames: batches stop waiting for it."""
        with self._cond:
            if stream in self._streams:
                self._streams.remove(stream)
            self._cond.notify_all()

    def submit(self, stream: "StreamSegmenter", tensor: np.ndarray | None, frame: np.ndarray) -> _Request:
        """Hand a frame over and wait until its batch has run; raises what the backend raised."""
        request = _Request(stream, tensor, frame, time.perf_counter())
        stream.offered(request.submitted)
        with self._cond:
            if self._closed:
                raise BackendError("the batcher is closed")
            self._pending.append(request)
            self._cond.notify_all()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)
        for request in self._pending:  # nobody will run them now
            request.error = BackendError("the batcher was closed before this frame ran")
            request.done.set()

    def __enter__(self) -> "Batcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the batching thread -------------------------------------------------------------------

    def _still_coming(self, limit: int) -> bool:
        """Whether a stream that has not offered a frame yet is about to (called under the lock)."""
        if len(self._pending) >= limit:
            return False
        return any(s.expected() for s in self._others())

    def _others(self) -> list["StreamSegmenter"]:
        """Streams with no frame offered or running now (under the lock)."""
        busy = {id(r.stream) for r in self._pending} | self._inflight
        return [s for s in self._streams if id(s) not in busy]

    def _take(self) -> list[_Request] | None:
        with self._cond:
            while True:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return None
                share = max(1, -(-len(self._streams) // self.instances))  # ceil(streams / instances)
                limit = min(self.limit, share) if self.limit is not None else share
                limit = max(limit, 1)
                if limit > 1:
                    # Counted from when this thread is free: frames that came during the last batch
                    # have waited already, but the streams it just answered need a moment to offer again.
                    deadline = time.perf_counter() + self._wait_s(limit)
                    while not self._closed and self._still_coming(limit):
                        left = deadline - time.perf_counter()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                if self._pending:
                    break
                # Another instance took the frames while this one waited for more: start over.
            # Frames of one shape only (a dynamic-size model may see several); the rest keep
            # their place for the next batch.
            shape = self._pending[0].shape
            batch = [r for r in self._pending if r.shape == shape][:limit]
            self._pending = [r for r in self._pending if r not in batch]
            self._inflight |= {id(r.stream) for r in batch}
            number, self._numbered = self._numbered, self._numbered + 1
            for r in batch:
                r.batch = number
            # Told in the order batches start (a mosaic draws them in that order).
            for listener in self.listeners:
                listener(number, [r.stream for r in batch])
            return batch

    def _wait_s(self, limit: int) -> float:
        """How long to wait for the streams still to come (under the lock)."""
        if self.max_wait_ms is not None:
            return self.max_wait_ms / 1e3
        gaps = [s.comeback for s in self._others() if s.comeback is not None]
        lo, hi = AUTO_WAIT_MS
        return min(hi, max(lo, AUTO_WAIT_FACTOR * 1e3 * max(gaps, default=0.0))) / 1e3

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        error: BaseException | None = None
        pre_ms = 0.0
        try:
            if self.frame_input:
                if len(batch) == 1:
                    outputs = [self.backend.infer_frame(batch[0].frame)]
                else:
                    out = self.backend.infer_frames([r.frame for r in batch])
                    outputs = [out[i:i + 1] for i in range(len(batch))]
                pre_ms = self.backend.own_preprocess_ms()
            else:
                tensors = [r.tensor for r in batch]
                pad = max(0, self.min_batch - len(tensors))
                x = tensors[0] if len(tensors) == 1 and not pad else np.concatenate(tensors + tensors[-1:] * pad)
                out = self.backend.infer(x)
                outputs = [out[i:i + 1] for i in range(len(batch))]
        except BaseException as exc:  # noqa: BLE001 - each waiting stream raises it in its own thread
            error, outputs = exc, [None] * len(batch)
        ms = (time.perf_counter() - started) * 1e3
        if error is None:
            with self._stats_lock:
                stats = self.stats
                stats.batches += 1
                stats.frames += len(batch)
                stats.sizes[len(batch)] = stats.sizes.get(len(batch), 0) + 1
                stats.infer.add(ms)
                stats.padded += 0 if self.frame_input else max(0, self.min_batch - len(batch))
        with self._cond:  # before the streams are woken: their next frame must not count as in flight
            self._inflight -= {id(r.stream) for r in batch}
            self._cond.notify_all()
        answered = time.perf_counter()
        for r, output in zip(batch, outputs):
            r.output, r.error, r.size, r.started, r.infer_ms = output, error, len(batch), started, ms
            r.own_preprocess_ms = pre_ms
            r.stream.answered(answered)
            r.done.set()


def frame_waiting(pipeline: Pipeline) -> bool:
    """Whether ``pipeline`` has a frame for its inference thread: a live one that was captured
    and not yet taken; for a file, until its end, always (its next frame is coming, and a file
    is read for throughput, not for latency)."""
    q = pipeline.frames_q
    if isinstance(q, LatestSlot):
        return q.waiting
    return q.qsize() > 0 or not pipeline.captured.is_set()


class StreamSegmenter(Segmenter):
    """What one stream's Pipeline uses as its segmenter: preprocessing and postprocessing in the
    stream's own thread, inference in its Batcher's batches. Timings: ``preprocess``, ``batch_wait``
    (handed over until its batch started), ``infer`` (the batch's inference), ``postprocess``."""

    def __init__(self, batcher: Batcher, name: str, expected: Callable[[], bool] | None = None) -> None:
        super().__init__(batcher.backend)
        self.batcher, self.name = batcher, name
        self.waiting: Callable[[], bool] = expected or (lambda: False)  # a frame waits to be offered
        self._preparing = False
        self.frames = 0
        self.comeback: float | None = None  # seconds this stream takes to offer a ready frame (EWMA)
        self._answered_ready: float | None = None  # when its last result came back, a frame ready then

    def answered(self, at: float) -> None:
        """Its result is back (batcher thread): time its next offer if a frame is ready now."""
        self._answered_ready = at if self.waiting() else None

    def offered(self, at: float) -> None:
        if self._answered_ready is not None:
            gap = at - self._answered_ready
            self.comeback = gap if self.comeback is None else 0.7 * self.comeback + 0.3 * gap
            self._answered_ready = None

    def expected(self) -> bool:
        """A frame of this stream is being prepared or waits to be taken."""
        return self._preparing or self.waiting()

    def process(self, frame: np.ndarray) -> Segmentation:
        self._preparing = True
        try:
            t0 = time.perf_counter()
            tensor = None if self.batcher.frame_input else preprocess(frame, self.meta)
            t1 = time.perf_counter()
        finally:
            self._preparing = False
        request = self.batcher.submit(self, tensor, frame)
        t2 = time.perf_counter()
        labels = postprocess(request.output, self.meta, frame.shape)
        t3 = time.perf_counter()
        self.frames += 1
        # As in Segmenter.process: a frame-input backend's own preprocessing is "preprocess",
        # so "infer" means the same on every backend.
        pre_ms = request.own_preprocess_ms
        timings = {"preprocess": (t1 - t0) * 1e3 + pre_ms, "batch_wait": (request.started - request.submitted) * 1e3,
                   "infer": request.infer_ms - pre_ms, "postprocess": (t3 - t2) * 1e3}
        return Segmentation(labels, timings, frame, batch=request.batch)

    __call__ = process

    def close(self) -> None:
        """This stream is done; the shared backend stays open (its owner closes it)."""
        self.batcher.leave(self)
