"""`dilseg run` and `dilseg bench` with several --source: one backend, the streams batched."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from .errors import CliError
from .multistream import STREAM_KEY, StreamFailed, stream_path

PER_STREAM_OUTPUTS = (("--output", "output", "video", "out_{i}.mp4"), ("--overlays", "overlays", "folder", "viz_{i}"),
                      ("--labels", "labels", "folder", "masks_{i}"))


def check_stream_outputs(args: argparse.Namespace, count: int) -> None:
    """Several streams cannot share one output file or folder: each name needs ``{i}``."""
    for flag, attr, what, example in PER_STREAM_OUTPUTS:
        value = getattr(args, attr, None)
        if value and count > 1 and STREAM_KEY not in value:
            stem = Path(value)
            suggestion = str(stem.with_name(f"{stem.stem}_{{i}}{stem.suffix}")) if what == "video" else f"{value}_{{i}}"
            raise CliError(f"{flag} {value}: {count} sources would all write into this one {what}; put {{i}} in the "
                           f"name for one per stream ({flag} {suggestion} writes "
                           f"{stream_path(suggestion, 0)}, {stream_path(suggestion, 1)}, ...)"
                           + (" or use --mosaic FILE.mp4 for one video of all streams tiled" if what == "video" else ""))


def check_stream_options(args: argparse.Namespace) -> None:
    for flag, value in (("--max-batch", args.max_batch), ("--instances", args.instances)):
        if value is not None and value < 1:
            raise CliError(f"{flag} {value}: must be 1 or more")


def stream_defaults(args: argparse.Namespace, model) -> None:
    """Several streams on OpenVINO with no --ov-hint: the throughput hint on a graph fixed at one
    frame, so a batch of the streams' frames runs as parallel requests, one per CPU stream, each
    on one core (OpenVINO runs a batch-N graph, fixed or dynamic, slower per frame than N frames
    of the batch-1 graph: README, Many cameras). A free batch axis keeps the latency hint: there
    the backend runs the whole batch as one request, which under the throughput hint would get
    one CPU stream's share of the cores."""
    if getattr(args, "ov_hint", None) is not None or args.backend not in ("auto", "openvino"):
        return
    path = model
    if args.backend == "auto":  # resolved as _open_backend resolves it
        from .autoselect import pick

        choice = pick(model) if isinstance(model, Path) else None
        if choice is None or choice.backend != "openvino":
            return
        path = choice.path
    from .backends.openvino_backend import shared_core

    try:
        fixed = not shared_core().read_model(str(path)).inputs[0].get_partial_shape()[0].is_dynamic
    except Exception:  # noqa: BLE001 - unreadable here: the backend's own load says why
        return
    if fixed:
        args.ov_hint = "throughput"


def _open_sources(specs: list[str], **opts) -> list:
    from .sources import SourceError, open_source

    opened = []
    try:
        for i, spec in enumerate(specs):
            try:
                opened.append(open_source(spec, **opts))
            except SourceError as exc:
                raise SourceError(f"--source #{i} ({spec}): {exc}") from None
    except BaseException:
        for source in opened:
            source.close()
        raise
    return opened


def run_streams(args: argparse.Namespace, specs: list[str], model) -> int:
    from .batching import default_instances
    from .bench import peak_rss_bytes
    from .cli_eval import check_json_target
    from .cli_run import _open_backend
    from .multistream import Mosaic, MultiStream
    from .sinks import open_sink
    from .view import ViewSettings

    count = len(specs)
    check_stream_outputs(args, count)
    check_stream_options(args)
    check_json_target(args.json)
    from .output_guard import check_outputs

    for i, spec in enumerate(specs):
        check_outputs(spec, args.output and stream_path(args.output, i),
                      [("--overlays", args.overlays and stream_path(args.overlays, i), ".jpg"),
                       ("--labels", args.labels and stream_path(args.labels, i), ".png")])
    opened_sinks: list = []
    with contextlib.ExitStack() as stack:
        sources = _open_sources(specs, reopen_attempts=args.reopen_attempts)
        for source in sources:
            stack.callback(source.close)
        try:
            per_stream = []
            for i, source in enumerate(sources):
                sinks = []
                for spec, opts in (([(f"video:{stream_path(args.output, i)}", {"fps": args.output_fps or source.fps})]
                                    if args.output else []) +
                                   ([(f"overlays:{stream_path(args.overlays, i)}", {})] if args.overlays else []) +
                                   ([(f"labels:{stream_path(args.labels, i)}", {})] if args.labels else [])):
                    sinks.append(open_sink(spec, **opts))
                    opened_sinks.append(sinks[-1])
                per_stream.append(sinks)
            mosaic_sinks = ([open_sink("window:dilseg")] if args.show else []) + \
                ([open_sink(f"video:{args.mosaic}", fps=args.output_fps or sources[0].fps)] if args.mosaic else [])
            opened_sinks += mosaic_sinks
            stream_defaults(args, model)
            backend = _open_backend(args, model)
        except BaseException:
            for sink in opened_sinks:
                sink.abort()
            raise
        stack.callback(backend.close)
        try:  # the batcher refuses what the backend cannot do (--max-batch, --instances): nothing written
            mosaic = Mosaic(mosaic_sinks, count, titles=[f"{i}: {s.spec}" for i, s in enumerate(sources)]) \
                if mosaic_sinks else None
            view = ViewSettings(args.view, args.alpha, legend=args.legend)
            run = MultiStream(sources, backend, per_stream, view=view, mosaic=mosaic, max_frames=args.max_frames,
                              warmup=args.warmup, max_batch=args.max_batch,
                              instances=args.instances or default_instances(backend, count), progress=not args.quiet)
        except BaseException:
            for sink in opened_sinks:
                sink.abort()
            raise
        live = sum(s.live for s in sources)
        print(f"dilseg run: {Path(str(model)).name} ({backend.name}) on {count} sources ({live} live); "
              f"{run.batcher.describe()}", file=sys.stderr)
        stats = run.run()
    print(stats.summary())
    print(f"peak RSS {peak_rss_bytes() / (1 << 20):.1f} MiB")
    for report in stats.streams:
        for sink in report.sinks:
            count_ = getattr(sink, "count", 0)
            print(f"stream {report.index}: wrote {sink.spec} ({count_} frames)" if count_ and report.error is None
                  else f"stream {report.index}: nothing written to {sink.spec}")
    if mosaic is not None and args.mosaic:
        print(f"wrote mosaic {args.mosaic} ({stats.mosaic_frames} pictures)" if stats.mosaic_frames and not stats.errors
              else f"nothing written to mosaic {args.mosaic}")
    if args.json:
        write_json(args.json, stats.to_dict())
        print(f"wrote {args.json}")
    _raise_stream_errors(stats)
    from . import exit_status

    if stats.stopped_by in ("SIGINT", "SIGTERM"):
        return exit_status.for_stop(stats.stopped_by)
    lost = [r for r in stats.streams if r.stats.stopped_by == "source lost"]
    for report in lost:
        print(f"dilseg run: source lost: stream {report.index} ({report.spec}) gave up after {args.reopen_attempts} "
              "reopen attempts; its outputs hold the frames before", file=sys.stderr)
    return exit_status.SOURCE_LOST if lost else exit_status.OK


def _raise_stream_errors(stats) -> None:
    """A failed stream fails the command (after every stream's report was printed)."""
    from .errors import DilsegError

    failed = stats.errors
    if not failed:
        return
    first = failed[0].error
    if not isinstance(first, DilsegError):
        raise first  # a bug keeps its traceback
    others = f" ({len(failed) - 1} more stream(s) failed, see above)" if len(failed) > 1 else ""
    raise StreamFailed(f"stream {failed[0].index} ({failed[0].spec}): {first}{others}")


def write_json(path: str, data: dict) -> None:
    from .files import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(data, indent=2, default=float).encode())


def bench_streams(args: argparse.Namespace, specs: list[str], model) -> int:
    """The multi-stream pipeline on every source for WARMUP + FRAMES frames each, then raw
    inference of one frame against a batch of as many frames as there are streams."""
    import numpy as np

    from .batching import default_instances
    from .bench import peak_rss_bytes, raw_inference
    from .cli_eval import check_json_target
    from .cli_run import _open_backend
    from .multistream import MultiStream
    from .preprocess import preprocess
    from .sinks import Sink

    check_stream_options(args)
    check_json_target(args.json)
    last: dict = {}
    with contextlib.ExitStack() as stack:
        sources = _open_sources(specs)
        for source in sources:
            stack.callback(source.close)
        stream_defaults(args, model)
        backend = _open_backend(args, model)
        stack.callback(backend.close)
        run = MultiStream(sources, backend, [[Sink()] for _ in sources], max_frames=args.warmup + args.frames,
                          warmup=args.warmup, max_batch=args.max_batch,
                          instances=args.instances or default_instances(backend, len(sources)),
                          progress=not args.quiet,
                          on_result=lambda i, result: last.__setitem__(i, result.frame))
        stats = run.run()
        _raise_stream_errors(stats)
        if not last:
            raise CliError("the sources gave no frame to benchmark; check them with `dilseg run --source ...`")
        single = preprocess(next(iter(last.values())), backend.meta)
        lo, hi = backend.batch_range()
        size = max(lo, min(len(sources), args.max_batch or len(sources), hi or len(sources)))
        batch = np.concatenate([single] * size) if size > 1 else single
        reps = max(5, min(args.frames, 50))
        one_fps, one_ms, _ = raw_inference(backend, single if lo == 1 else batch, reps, min(args.warmup, 3))
        many_fps, many_ms, _ = raw_inference(backend, batch, max(3, reps // size), min(args.warmup, 3))
    per_frame_one = one_ms["p50"] / (1 if lo == 1 else size)
    per_frame_many = many_ms["p50"] / size
    raw = {"batch": size, "single_ms_per_frame": per_frame_one, "batch_ms": many_ms["p50"],
           "batch_ms_per_frame": per_frame_many, "batch_fps": many_fps * size, "single_fps": one_fps}
    print(stats.summary())
    print(f"raw inference, p50: one frame {per_frame_one:.2f} ms; a batch of {size} {many_ms['p50']:.2f} ms = "
          f"{per_frame_many:.2f} ms per frame ({per_frame_one / per_frame_many if per_frame_many else 0:.2f}x "
          "the frames per second)")
    print(f"peak RSS {peak_rss_bytes() / (1 << 20):.1f} MiB")
    if args.json:
        write_json(args.json, {"model": str(model), "backend": backend.name, **stats.to_dict(), "raw": raw})
        print(f"wrote {args.json}")
    return 0
