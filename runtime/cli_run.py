"""`dilseg run`, `dilseg info` and `dilseg bench` (torch-free; heavy imports happen when they run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .exit_status import HELP as EXIT_HELP

SOURCE_HELP = """\
sources (--source):
  0, 1, ...                 webcam index
  video.mp4                 video file (every frame, in order; corrupt frames skipped and counted)
  photo.jpg | frames/       one image | a folder of images (natural sort order)
  rtsp://... http(s)://...  network stream (live: newest frame only, reopened with back-off)
  csi://0                   Jetson CSI camera (nvarguscamerasrc; needs OpenCV with GStreamer)
  "v4l2src ! ... ! appsink" raw GStreamer pipeline ending in appsink
  test://[WxH][?fps=F&frames=N&live=0&drop_every=N]
                            synthetic moving pattern (default 640x480, live at 30 FPS;
                            frames=N or live=0: file-like, every frame, unpaced)"""

RUN_EPILOG = f"""\
examples:
  dilseg run --source 0 --show                                  # webcam, shipped model
  dilseg run --model edge_m.onnx --source drive.mp4 --output seg.mp4 --legend
  dilseg run --source frames/ --labels masks/ --overlays viz/   # a folder, masks named after the images
  dilseg run --source rtsp://cam.local/stream --show --view side-by-side
  dilseg run --model edge_m.engine --source csi://0 --show      # Jetson, TensorRT engine
  dilseg run --model runs/edge_m/best.safetensors --source drive.mp4 --output seg.mp4   # PyTorch (needs torch)
  dilseg run --model edge_m.onnx --backend tensorrt --fp16 --cuda-graph --source 0 --show   # engine built once, cached
  dilseg run --source test://320x240 --max-frames 300           # smoke test, no camera needed
  dilseg run --model triton://gpu-box:8001/edge_m --source 0 --show   # served by Triton (dilseg export triton)

several sources (one backend; their frames batched into one inference when the model's batch
axis is free: `dilseg export onnx --from MODEL.onnx --batch dynamic -o MODEL_batch.onnx`):
  dilseg run --model edge_m_batch.onnx --source rtsp://cam1/s --source rtsp://cam2/s --mosaic all.mp4
  dilseg run --source a.mp4 --source b.mp4 --output seg_{{i}}.mp4 --labels masks_{{i}}/   # {{i}}: 0, 1, ...
  dilseg run --source 0 --source 1 --show --json streams.json   # one window, the streams tiled

{SOURCE_HELP}

Live sources keep only the newest frame (latency first; drops are counted); files and
folders lose no frame. Ctrl-C or SIGTERM stops cleanly: the output video is finalised
and playable, label/overlay images are written whole. A stats summary (per-stage
p50/p95, FPS, drops, corrupt frames, reopens, memory) is printed at the end.
With several sources each stream keeps its own policy, outputs and reconnects (a stream
that drops is retried while the others go on), a batch takes at most one frame per stream,
and the summary has a row per stream (FPS, latency p50/p95, dropped, corrupt, reopens).

{EXIT_HELP}"""

INFO_EPILOG = """\
examples:
  dilseg info                        # the shipped CamVid model
  dilseg info edge_m.onnx            # classes, palette, input size, normalisation, output kind, I/O
  dilseg info edge_m.engine          # the engine's sidecar: model metadata plus build facts
  dilseg info edge_m.onnx --json     # machine-readable
  dilseg info --backends             # what runs here, and what --backend auto picks for the shipped model and why
  dilseg info triton://127.0.0.1:8001/edge_m   # what a Triton server says about the model it serves"""

BENCH_EPILOG = f"""\
examples:
  dilseg bench                                          # shipped model on test://480x360?live=0
  dilseg bench --model edge_m.onnx --source drive.mp4 --frames 300
  dilseg bench --model edge_m.engine --frames 500 --json bench.json
  dilseg bench --model runs/edge_m/best.safetensors     # the trained weights on PyTorch, same pipeline
  dilseg bench --model triton://127.0.0.1:8001/edge_m --shared-memory off   # Triton on this machine, over the socket
  dilseg bench --model edge_m_batch.onnx --source test:// --source test:// --source test:// --source test://

It runs the whole pipeline (source -> preprocess -> infer -> postprocess -> render, no sink)
for WARMUP + FRAMES frames, reporting per-stage p50/p95 latency and end-to-end FPS, then
times back-to-back calls of the same model on the same frame, the call the pipeline makes
(TensorRT: infer_frame, the frame preprocessed on the GPU; else infer of the preprocessed frame):
end-to-end / raw near 1 means the other stages hide behind inference. With --cuda-graph the same
call is also timed without the graph, in interleaved rounds, and the speed-up printed. "infer" is the wall time
of the inference call on every backend; one that splits its own time (TensorRT: CUDA-event
gpu_upload/gpu_infer/gpu_download) has those listed too. Peak RSS is the process's high-water mark.

{SOURCE_HELP}"""

DEFAULT_BENCH_SOURCE = "test://480x360?live=0"


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    r = sub.add_parser("run", help="segment a camera, video, images or stream", epilog=RUN_EPILOG,
                       formatter_class=fmt,
                       description="Segment frames from a source and show or save the result.")
    _model_args(r)
    r.add_argument("--source", action="append", metavar="SOURCE",
                   help="what to segment (default test://, see below); repeat for several streams")
    r.add_argument("--output", metavar="FILE", help="write the rendered video here (.mp4 .avi .mkv .mov)")
    r.add_argument("--output-fps", type=float, help="frame rate of --output (default: the source's, else 30)")
    r.add_argument("--overlays", metavar="DIR", help="write each rendered frame as an image into DIR")
    r.add_argument("--labels", metavar="DIR", help="write each mask as an 8-bit PNG of class ids into DIR")
    r.add_argument("--show", action="store_true", help="show a window (q or Esc quits)")
    r.add_argument("--alpha", type=float, default=0.5, help="mask opacity in the overlay, 0..1 (default 0.5)")
    r.add_argument("--view", choices=["overlay", "mask", "side-by-side"], default="overlay",
                   help="what to render (default overlay)")
    r.add_argument("--legend", action="store_true", help="draw the class legend with area percentages")
    r.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames (per stream)")
    r.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="leave each stream's first N frames out of the FPS and latency figures (default 0)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--reopen-attempts", type=int, default=10, metavar="N",
                   help="a live source that drops is reopened up to N times in a row, with back-off from 0.5 s "
                        "doubling to 8 s, before the run gives up with exit status 3 (default 10)")
    r.add_argument("--json", metavar="FILE", help="also write the run's stats as JSON (per stream with several)")
    _streams_args(r)
    m = r.add_argument_group("several sources")
    m.add_argument("--mosaic", metavar="FILE", help="one video of every stream tiled in a grid, a picture per batch")
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("info", help="print a model's metadata (.onnx, .engine or triton://); --backends: what "
                                    "runs here", epilog=INFO_EPILOG,
                       formatter_class=fmt, description="Print what an exported model or engine says about itself.")
    i.add_argument("artifact", nargs="?", help="an .onnx file, an .engine/.plan (with its .json sidecar) or a "
                                                "triton://HOST:PORT/MODEL; default: the shipped CamVid model")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--backends", action="store_true",
                   help="the backends that run here, this machine's CPU features, and what --backend auto runs "
                        "for the artifact and why")
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="per-stage latency, end-to-end vs raw inference FPS, peak memory",
                       epilog=BENCH_EPILOG, formatter_class=fmt,
                       description="Benchmark the pipeline against raw inference of the same model.")
    _model_args(b)
    b.add_argument("--source", action="append", metavar="SOURCE",
                   help=f"what to read (default {DEFAULT_BENCH_SOURCE}); repeat to benchmark several streams batched")
    b.add_argument("--frames", type=int, default=200, help="measured frames (default 200)")
    b.add_argument("--warmup", type=int, default=20, help="frames run before measuring (default 20)")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    _streams_args(b)
    b.set_defaults(func=cmd_bench)


def _streams_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="several sources: at most N frames per inference (default: one per stream, as the model allows)")
    p.add_argument("--instances", type=int, metavar="N",
                   help="several sources: N inferences at once on the one loaded model, the streams shared out "
                        "(default 1; 2 on OpenVINO's throughput hint, which lends each call its own requests; on "
                        "ONNX Runtime, one per core with --threads 1 keeps every core busy)")


def _model_args(p: argparse.ArgumentParser) -> None:
    from .backends import backend_names

    p.add_argument("--model", help="an .onnx, .engine/.plan or .safetensors, or a model served by Triton: "
                                   "triton://HOST:PORT/MODEL[/VERSION] (gRPC), triton+http://... (default: the "
                                   "shipped CamVid model)")
    p.add_argument("--backend", choices=backend_names(), default="auto",
                   help="auto: .onnx -> ONNX Runtime, .engine/.plan -> TensorRT, .safetensors -> PyTorch (default auto)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: cores, at most 8)")
    t = p.add_argument_group("TensorRT backend (--backend tensorrt, or an .engine)")
    t.add_argument("--cuda-graph", action="store_true",
                   help="capture inference and copy-out as one CUDA graph per input shape and replay it (on the "
                        "GPU-preprocessed path too)")
    t.add_argument("--fp16", action="store_true",
                   help="when building from an fp32 .onnx: let TensorRT 10 use fp16 kernels (TensorRT 11: "
                        "export an fp16 ONNX instead)")
    t.add_argument("--dla-core", type=int, metavar="N", help="when building from an .onnx: run on DLA core N "
                                                            "(GPU fallback), Jetson AGX Orin / Orin NX")
    t.add_argument("--rebuild", action="store_true", help="rebuild the cached engine of an .onnx even if it matches")
    o = p.add_argument_group("OpenVINO backend (--backend openvino; pip install 'dilseg[openvino]')")
    o.add_argument("--ov-precision", choices=["f32", "bf16", "f16"],
                   help="OpenVINO's inference precision (default: the CPU's own, bf16 with AMX or AVX-512 BF16)")
    o.add_argument("--ov-hint", choices=["latency", "throughput"],
                   help="latency: one request on every core (default for one source); throughput: parallel requests "
                        "(default for several sources on a model fixed at one frame: a batch runs as parallel requests)")
    o.add_argument("--ov-cache", metavar="DIR", help="compiled-model cache (default ~/.cache/dilseg/openvino)")
    c = p.add_argument_group("Triton client (--model triton://HOST:PORT/MODEL, from `dilseg export triton`)")
    c.add_argument("--timeout", type=float, metavar="S", help="seconds a request may take (default 10)")
    c.add_argument("--reconnect", type=float, metavar="S",
                   help="seconds to wait for a lost server to come back, resending the frame in flight (default 60; "
                        "0: fail at once)")
    c.add_argument("--shared-memory", choices=["auto", "on", "off"], nargs="?", const="on", default="auto",
                   help="frames and labels through system shared memory instead of the socket: auto (default) when "
                        "the server is on this machine and can map it, on (or the bare flag) insists, off never")


def _setup_logging() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="dilseg: %(message)s", stream=sys.stderr)


def _backend_label(backend) -> str:
    """The backend's name, and for a served model how frames travel (gRPC, + shared memory)."""
    transport = getattr(backend, "transport", "")
    return f"{backend.name}, {transport}" if transport else backend.name


def _open_backend(args: argparse.Namespace, model: Path | str):
    """The backend for ``model`` with the options given on the command line; an option the chosen
    backend does not have is refused by the factory, whichever backend it is."""
    return _open_auto(args, model)[0]


def _open_auto(args: argparse.Namespace, model: Path | str):
    """(backend, autoselect.Choice or None). ``--backend auto`` on a model with variants runs the
    fastest correct one for this machine and says which and why."""
    from .backends import open_backend

    given = {"threads": args.threads or None, "cuda_graph": args.cuda_graph or None, "fp16": args.fp16 or None,
             "dla_core": args.dla_core, "rebuild": args.rebuild or None, "timeout": args.timeout,
             "reconnect": args.reconnect,
             "shared_memory": {"on": True, "off": False}.get(getattr(args, "shared_memory", "auto")),
             "ov_precision": getattr(args, "ov_precision", None), "ov_hint": getattr(args, "ov_hint", None),
             "ov_cache": getattr(args, "ov_cache", None)}
    given = {k: v for k, v in given.items() if v is not None}
    if args.backend == "auto" and isinstance(model, Path):
        from .autoselect import pick

        choice = pick(model)
        if choice is not None:
            print(f"dilseg: {choice.describe()}; --backend onnxruntime runs {model.name} itself", file=sys.stderr)
            return open_backend(choice.path, choice.backend, **{**choice.options, **given}), choice
    return open_backend(model, args.backend, **given), None


def cmd_run(args: argparse.Namespace) -> int:
    import contextlib

    from . import exit_status
    from .bench import RssProbe, peak_rss_bytes
    from .defaults import resolve_model
    from .errors import CliError
    from .pipeline import Pipeline
    from .segmenter import Segmenter
    from .sinks import open_sink
    from .sources import open_source
    from .view import ViewSettings

    _setup_logging()
    if not 0.0 <= args.alpha <= 1.0:
        raise CliError(f"--alpha {args.alpha}: must be within 0..1")
    if args.max_frames is not None and args.max_frames < 1:
        raise CliError(f"--max-frames {args.max_frames}: must be >= 1")
    if args.warmup < 0:
        raise CliError(f"--warmup {args.warmup}: must be >= 0")
    sources = args.source or ["test://"]
    model = resolve_model(args.model)
    if len(sources) > 1 or args.mosaic or args.max_batch is not None or args.instances is not None:
        from .cli_multistream import run_streams

        return run_streams(args, sources, model)
    args.source = sources[0]
    from .cli_eval import check_json_target
    from .output_guard import check_outputs

    check_json_target(args.json)
    if args.reopen_attempts < 0:
        raise CliError(f"--reopen-attempts {args.reopen_attempts}: must be >= 0")
    check_outputs(args.source, args.output, [("--overlays", args.overlays, ".jpg"), ("--labels", args.labels, ".png")])
    with contextlib.ExitStack() as stack:
        # Everything is opened and validated before the first frame: a bad source, an unwritable
        # output or an unloadable model fails here, and the sinks opened so far leave nothing.
        source = stack.enter_context(open_source(args.source, reopen_attempts=args.reopen_attempts))
        sinks = []
        specs = ([("window", {})] if args.show else []) + \
                ([(f"video:{args.output}", {"fps": args.output_fps or source.fps})] if args.output else []) + \
                ([(f"overlays:{args.overlays}", {})] if args.overlays else []) + \
                ([(f"labels:{args.labels}", {})] if args.labels else [])
        try:
            for spec, opts in specs:
                sinks.append(open_sink(spec, **opts))
            backend, choice = _open_auto(args, model)
        except BaseException:
            for sink in sinks:
                sink.abort()
            raise
        stack.callback(backend.close)
        probe = RssProbe(after=100)
        view = ViewSettings(args.view, args.alpha, legend=args.legend)
        pipeline = Pipeline(source, Segmenter(backend), sinks, view=view, max_frames=args.max_frames, on_result=probe,
                            progress=not args.quiet, warmup=args.warmup)
        print(f"dilseg run: {getattr(backend.path, 'name', model) if choice else getattr(model, 'name', model)} "
              f"({_backend_label(backend)}) on {source.spec}"
              f"{' (live)' if source.live else ''}; outputs: {', '.join(s.spec for s in sinks) or 'none'}",
              file=sys.stderr)
        try:
            stats = pipeline.run()
        except BaseException:
            _report_kept(pipeline)
            raise
        probe.end()
    print(stats.summary())
    mib = 1 / (1 << 20)
    rss = f"peak RSS {peak_rss_bytes() * mib:.1f} MiB"
    if probe.warm and probe.last:
        rss += f" (after {probe.after} frames {probe.warm * mib:.1f} MiB, at the end {probe.last * mib:.1f} MiB)"
    print(rss)
    for sink in sinks:
        if not sink.spec.startswith("window"):
            count = getattr(sink, "count", 0)
            print(f"wrote {sink.spec} ({count} frames)" if count else f"nothing written to {sink.spec}")
    if args.json:
        from .cli_multistream import write_json

        lat = stats.stages.get("latency")
        write_json(args.json, {"source": source.spec, "live": source.live, **stats.to_dict(),
                               "latency_ms": {"p50": lat.percentile(50), "p95": lat.percentile(95)} if lat else None})
        print(f"wrote {args.json}")
    if stats.stopped_by == "source lost":
        print(f"dilseg run: source lost: {source.spec} gave up after {args.reopen_attempts} reopen attempts; "
              "the outputs hold the frames before", file=sys.stderr)
    return exit_status.for_stop(stats.stopped_by)


def _report_kept(pipeline) -> None:
    """After a failed run: which outputs were finalised complete (with the frames they got)."""
    for sink in pipeline.kept:
        count = getattr(sink, "count", 0)
        if count and not sink.spec.startswith("window"):
            print(f"dilseg run: kept {sink.spec} ({count} frames, complete)", file=sys.stderr)
    for sink in pipeline.failed_sinks:
        count = getattr(sink, "count", 0)
        if count and getattr(sink, "folder", None) is not None:  # each image was written whole, or not at all
            print(f"dilseg run: {sink.spec}: the {count} images written before it failed are complete",
                  file=sys.stderr)


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from .artifact import is_engine, read_meta, read_sidecar
    from .defaults import resolve_model

    path = resolve_model(args.artifact, flag="ARTIFACT")
    if getattr(args, "backends", False):
        from .autoselect import backend_lines

        print("\n".join(backend_lines(None if isinstance(path, str) else path)))
        return 0
    if isinstance(path, str):  # a triton:// URL: what the server says about the model it serves
        from .backends import open_backend

        with open_backend(path) as served:
            meta, facts = served.meta, {"artifact": path, "served": served.describe()}
    else:
        meta = read_meta(path)
        facts = {"artifact": str(path), "size_bytes": path.stat().st_size}
        if is_engine(path):
            facts["build"] = {k: v for k, v in read_sidecar(path).items() if k != "meta"}
        else:
            facts["io"] = _onnx_io(path)
    if args.json:
        print(json.dumps({**facts, "meta": meta.to_dict()}, indent=2, sort_keys=True))
        return 0
    size = f"{meta.input_size[0]}x{meta.input_size[1]}" if meta.input_size else "dynamic (any HxW, multiples of 8)"
    lines = [
        f"{path}  ({facts['size_bytes'] / (1 << 20):.1f} MiB)" if "size_bytes" in facts else f"{path}  (served by Triton)",
        f"model          {meta.model}",
        f"input          {meta.layout} {size}, colour order {meta.color_order}",
        f"normalisation  (pixel/255 - mean) / std, mean {list(meta.mean)}, std {list(meta.std)}",
        f"output         {meta.output_kind}" + (" (argmax in the graph: int class ids)" if meta.output_kind == "labels"
                                                 else " (N x C x H x W scores)"),
        f"precision      {meta.precision}",
        f"weights sha256 {meta.weights_sha256 or '(fresh initialisation)'}",
        f"dilseg version {meta.dilseg_version or '?'}",
        f"ignore index   {meta.ignore_index}",
        f"classes        {meta.num_classes}",
    ]
    for i, (name, rgb) in enumerate(zip(meta.classes, meta.palette)):
        lines.append(f"  {i:>3}  {name:<16} RGB {tuple(rgb)}")
    for key, value in sorted(meta.extra.items()):
        lines.append(f"extra.{key:<8} {value}")
    if "io" in facts:
        for kind in ("inputs", "outputs"):
            for t in facts["io"][kind]:
                lines.append(f"{kind[:-1]:<14} {t['name']}: {t['type']} {t['shape']}")
    for key, value in sorted({**facts.get("build", {}), **facts.get("served", {})}.items()):
        lines.append(f"{key:<14} {value}")
    print("\n".join(lines))
    return 0


def _onnx_io(path: Path) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return {kind: [{"name": t.name, "type": t.type, "shape": list(t.shape)} for t in getattr(sess, f"get_{kind}")()]
            for kind in ("inputs", "outputs")}


def cmd_bench(args: argparse.Namespace) -> int:
    import contextlib

    from .bench import bench
    from .cli_eval import check_json_target
    from .defaults import resolve_model
    from .errors import CliError
    from .sources import open_source

    _setup_logging()
    if args.frames < 1 or args.warmup < 0:
        raise CliError("--frames must be >= 1 and --warmup >= 0")
    check_json_target(args.json)  # before the benchmark, not after it
    sources = args.source or [DEFAULT_BENCH_SOURCE]
    model = resolve_model(args.model)
    if len(sources) > 1 or args.max_batch is not None or args.instances is not None:
        from .cli_multistream import bench_streams

        return bench_streams(args, sources, model)
    args.source = sources[0]
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(open_source(args.source))
        backend, choice = _open_auto(args, model)
        stack.callback(backend.close)
        how = choice.describe() if choice else (_backend_label(backend) if getattr(backend, "transport", "") else "")
        result = bench(source, backend, frames=args.frames, warmup=args.warmup,
                       model=f"{backend.path if choice else model}{f' ({how})' if how else ''}", progress=not args.quiet)
    print(result.report())
    if args.json:
        result.write_json(args.json)
        print(f"wrote {args.json}")
    return 0
