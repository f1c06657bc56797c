"""`dilseg build`: ONNX -> TensorRT engine + sidecar, on the GPU or Jetson that will run it.

A runtime command (building happens on the device, where there is no torch), tensorrt-free
at import: the handler validates everything it can first, then imports TensorRT only to build.
"""

from __future__ import annotations

import argparse
import sys

from .defaults import TRT_WORKSPACE_MIB

BUILD_EPILOG = """\
examples:
  dilseg build edge_m.onnx -o edge_m.engine                        # precision from the ONNX graph
  dilseg build edge_m.onnx -o edge_m_fp16.engine --fp16             # fp32 ONNX lowered to fp16 (TensorRT 10 only)
  dilseg build edge_m_fp16.onnx -o edge_m_fp16.engine               # fp16 ONNX: fp16 engine on TensorRT 10 and 11
  dilseg build edge_m_int8.onnx -o edge_m_int8.engine               # int8 Q/DQ ONNX (--target tensorrt flavour)
  dilseg build dyn.onnx -o dyn.engine --min 1x3x256x320 --opt 1x3x360x480 --max 1x3x720x1280
  dilseg build dyn.onnx -o dyn.engine --opt input:1x3x368x640      # one fixed size from a dynamic ONNX
  dilseg build edge_m.onnx -o edge_m.engine --timing-cache trt.cache  # reuse/extend tactic timings
  dilseg build edge_m_fp16.onnx -o dla0.engine --dla-core 0         # Jetson DLA, GPU fallback
  dilseg build edge_m.onnx -o portable.engine --hardware-compatible --version-compatible

Engines only run on the TensorRT version and GPU they were built with: build on the target
device. The sidecar MODEL.engine.json records the model metadata and what the engine was
built for (TensorRT version, GPU, compute capability, precision, shape profile, ONNX sha256);
`dilseg info MODEL.engine` shows it. TensorRT 11 is strongly typed only: there --fp16 is
refused, export an fp16 ONNX (`dilseg export onnx --precision fp16`) instead.
Int8 ONNX of the 'cpu' flavour (uint8 activations) is refused: TensorRT needs symmetric Q/DQ."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build a TensorRT engine from an ONNX model (on the target GPU)",
                       description="Build a TensorRT engine (TensorRT 10.x or 11.x) from a dilseg ONNX model.",
                       epilog=BUILD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("onnx", metavar="MODEL.onnx", help="ONNX exported by `dilseg export onnx` (fp32, fp16 or int8 Q/DQ)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.engine",
                   help="engine to write, .engine or .plan (complete or absent), with MODEL.engine.json beside it")
    p.add_argument("--fp16", action="store_true",
                   help="build an fp32 ONNX in fp16 (TensorRT 10 weak typing; not available on TensorRT 11)")
    p.add_argument("--min", dest="min_shape", metavar="SHAPE", help="smallest input, NxCxHxW (dynamic ONNX), e.g. 1x3x256x320")
    p.add_argument("--opt", dest="opt_shape", metavar="SHAPE", help="input size TensorRT tunes for, e.g. 1x3x360x480")
    p.add_argument("--max", dest="max_shape", metavar="SHAPE", help="largest input, e.g. 1x3x720x1280")
    p.add_argument("--workspace", type=int, default=TRT_WORKSPACE_MIB, metavar="MiB",
                   help=f"builder workspace memory limit in MiB (default {TRT_WORKSPACE_MIB})")
    p.add_argument("--timing-cache", metavar="FILE", help="tactic timing cache: read if present, written back after the build")
    p.add_argument("--dla-core", type=int, metavar="N", help="build for DLA core N (Jetson), layers DLA cannot run fall back to the GPU")
    p.add_argument("--hardware-compatible", action="store_true",
                   help="engine that runs on any Ampere-or-newer GPU (slower; TensorRT's AMPERE_PLUS level)")
    p.add_argument("--version-compatible", action="store_true",
                   help="engine that runs on later TensorRT releases of the same major version (slower)")
    p.add_argument("--device", type=int, default=0, help="CUDA device to build on (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from .trt.build import BuildOptions, build_engine, prepare

    options = BuildOptions(fp16=args.fp16, min_shape=args.min_shape, opt_shape=args.opt_shape, max_shape=args.max_shape,
                           workspace_mib=args.workspace, timing_cache=args.timing_cache, dla_core=args.dla_core,
                           hardware_compatible=args.hardware_compatible, version_compatible=args.version_compatible,
                           progress=not args.no_progress, device=args.device)
    prepared = prepare(args.onnx, args.output, options)  # everything checkable without TensorRT
    print(f"building {args.output} from {prepared.info.path} ({prepared.info.meta.model}, "
          f"{prepared.info.meta.precision} ONNX, {prepared.profile})", file=sys.stderr)
    result = build_engine(args.onnx, args.output, options, log=lambda m: print(m, file=sys.stderr), prepared=prepared)
    side = result.sidecar
    print(f"built {result.engine_path} in {result.seconds:.1f} s: {side['precision']} engine for {side['gpu_name']} "
          f"(compute capability {side['compute_capability']}), TensorRT {side['tensorrt_version']}, "
          f"{side['engine_size'] / 2**20:.1f} MiB")
    if args.timing_cache:
        print(f"timing cache written to {args.timing_cache}")
    return 0
