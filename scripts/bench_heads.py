#!/usr/bin/env python3
"""Compare the export heads (export/heads.py) of a trained model: accuracy and cost per runtime.

For every head, exports the weights to an fp32 ONNX and its int8 ``cpu``-flavour variant,
evaluates both on CamVid val (mIoU through the runtime, as `dilseg eval`), and times each on
ONNX Runtime and (when installed) OpenVINO at f32 and bf16, every contender in alternating
blocks in one run. The head's own cost comes from each runtime's per-node profile (ONNX
Runtime's session profiler, OpenVINO's PERF_COUNT): every kernel after the last convolution
(Resize/Interpolate, ArgMax, label Resize, Casts, layout reorders and their Q/DQ). OpenVINO
compiles each model as the OpenVINO backend does, its ArgMax rewrite included.

    python scripts/bench_heads.py --weights models/edge_m_camvid.safetensors --data ../shared/data/camvid
    python scripts/bench_heads.py --heads full,half --runs 100 --json heads.json

Prints markdown tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_model import interleaved_medians  # noqa: E402

# The head is every kernel a run executes after its last convolution (the class scores'
# producer): upsampling, ArgMax (or OpenVINO's rewrite of it), label resize, casts, layout
# reorders and their Q/DQ.
CONV_OPS = {"Conv", "QLinearConv", "FusedConv", "NchwcConv", "ConvInteger", "Convolution"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="models/edge_m_camvid.safetensors")
    p.add_argument("--size", default="360x480")
    p.add_argument("--heads", default="full,half,quarter,eighth", help="comma-separated (export/heads.py HEADS)")
    p.add_argument("--data", default="../shared/data/camvid")
    p.add_argument("--calib-images", type=int, default=100)
    p.add_argument("--runs", type=int, default=60, help="timed runs per contender (median)")
    p.add_argument("--profile-runs", type=int, default=40, help="profiled runs per model for the head's share")
    p.add_argument("--no-openvino", action="store_true", help="ONNX Runtime only")
    p.add_argument("--keep", metavar="DIR", help="keep the exported models here")
    p.add_argument("--reuse", action="store_true", help="with --keep: reuse the models already in DIR")
    p.add_argument("--json", metavar="FILE")
    return p.parse_args(argv)


def export_heads(args: argparse.Namespace, out: Path) -> dict[str, dict[str, Path]]:
    import torch

    from dilseg.export.onnx_export import build_onnx, write_onnx
    from dilseg.export.quantize import calibration_images, make_variant
    from dilseg.export.torch_backend import weights_meta
    from dilseg.export.weights import load_model
    from dilseg.export.onnx_export import parse_size

    torch.set_num_threads(os.cpu_count() or 1)
    size = parse_size(args.size)
    model, _ = load_model(args.weights)
    meta = weights_meta(args.weights, size)
    calib = calibration_images(Path(args.data) / "train", args.calib_images)
    paths: dict[str, dict[str, Path]] = {}
    for head in args.heads.split(","):
        fp32, int8 = out / f"{head}.onnx", out / f"{head}.int8cpu.onnx"
        paths[head] = {"fp32": fp32, "int8": int8}
        if args.reuse and fp32.is_file() and int8.is_file():
            continue
        print(f"exporting head {head}", file=sys.stderr)
        proto, hmeta, _ = build_onnx(model, meta, size, head=head)
        write_onnx(proto, fp32)
        variant, _ = make_variant(proto, hmeta, "int8", calib, "cpu", "entropy")
        write_onnx(variant, int8)
    return paths


def miou(path: Path, data_root: str) -> float:
    from dilseg.runtime.backends import open_backend
    from dilseg.runtime.evaluate import dataset_for, evaluate

    backend = open_backend(path)
    try:
        return 100.0 * evaluate(backend, dataset_for(backend.meta, data_root, "val"), progress=False).scores.miou
    finally:
        backend.close()


def ort_session(path: Path, profile: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "dilseg-head-profile")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def tail_after_last_conv(kernels: list[tuple[str, float]]) -> float:
    """Sum of the durations after the last convolution in one run's kernels, in execution order."""
    last = max((i for i, (op, _) in enumerate(kernels) if op in CONV_OPS), default=-1)
    return sum(ms for _, ms in kernels[last + 1:])


def ort_head_ms(path: Path, x: np.ndarray, runs: int) -> tuple[float, float]:
    """(head ms, all kernels ms) per run from ONNX Runtime's profiler."""
    sess = ort_session(path, profile=True)
    for _ in range(runs):
        sess.run(None, {"input": x})
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    kernels = sorted((e["ts"], e["args"]["op_name"], e["dur"] / 1e3) for e in events
                     if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))
    per_run = len(kernels) // runs
    head = total = 0.0
    for r in range(runs):
        chunk = [(op, ms) for _, op, ms in kernels[r * per_run:(r + 1) * per_run]]
        head += tail_after_last_conv(chunk)
        total += sum(ms for _, ms in chunk)
    return head / runs, total / runs


def ov_compiled(path: Path, precision: str, profile: bool = False):
    """Compiled as the OpenVINO backend compiles it (its ArgMax rewrite included)."""
    from dilseg.runtime.backends.openvino_backend import rewrite_argmax, shared_core

    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": os.cpu_count() or 1}
    if profile:
        config["PERF_COUNT"] = True
    core = shared_core()
    model = core.read_model(str(path))
    rewrite_argmax(model)
    return core.compile_model(model, "CPU", config)


def ov_head_ms(path: Path, precision: str, x: np.ndarray, runs: int) -> tuple[float, float]:
    request = ov_compiled(path, precision, profile=True).create_infer_request()
    head = total = 0.0
    for _ in range(runs):
        request.infer({0: x})
        kernels = [(info.node_type, info.real_time.total_seconds() * 1e3) for info in request.profiling_info]
        head += tail_after_last_conv(kernels)
        total += sum(ms for _, ms in kernels)
    return head / runs, total / runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dilseg.export.onnx_export import parse_size
    from dilseg.runtime.dataset import open_images
    from dilseg.runtime.metadata import ModelMeta  # noqa: F401 (import check before the slow part)
    from dilseg.runtime.artifact import read_meta
    from dilseg.runtime.preprocess import preprocess

    have_ov = False
    if not args.no_openvino:
        try:
            import openvino  # noqa: F401
            have_ov = True
        except ImportError:
            print("openvino not installed: ONNX Runtime only (pip install openvino)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="dilseg-heads-") as tmp:
        out = Path(args.keep or tmp)
        out.mkdir(parents=True, exist_ok=True)
        paths = export_heads(args, out)
        first = next(iter(paths.values()))["fp32"]
        x = preprocess(open_images(args.data, "val").read_image(0), read_meta(first))
        acc = {h: {k: miou(p, args.data) for k, p in ps.items()} for h, ps in paths.items()}
        contenders, fns = {}, {}
        for head, ps in paths.items():
            for kind, path in ps.items():
                sess = ort_session(path)
                contenders[(head, f"ort {kind}")] = (path, None)
                fns[(head, f"ort {kind}")] = lambda s=sess: s.run(None, {"input": x})
            if have_ov:
                for kind, prec in (("fp32", "f32"), ("fp32", "bf16"), ("int8", "f32")):
                    req = ov_compiled(ps[kind], prec).create_infer_request()
                    label = f"ov {kind} {prec}" if kind == "fp32" else "ov int8"
                    contenders[(head, label)] = (ps[kind], prec)
                    fns[(head, label)] = lambda r=req: r.infer({0: x})
        print(f"timing {len(fns)} contenders in alternating blocks", file=sys.stderr)
        ms = interleaved_medians(fns, args.runs)
        head_ms = {}
        for key, (path, prec) in contenders.items():
            head_ms[key] = ov_head_ms(path, prec, x, args.profile_runs) if prec else \
                ort_head_ms(path, x, args.profile_runs)
    size = parse_size(args.size)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {size[0]}x{size[1]}, "
          f"batch 1, median of {args.runs} runs in alternating blocks; mIoU on CamVid val")
    print()
    print("| head | fp32 val mIoU % | int8 cpu val mIoU % |")
    print("|---|---|---|")
    for head, a in acc.items():
        print(f"| {head} | {a['fp32']:.2f} | {a['int8']:.2f} |")
    print()
    print("| head | runtime | latency ms | head ms (profiled) | head share | head cost vs full |")
    print("|---|---|---|---|---|---|")
    for (head, label), t in ms.items():
        h, total = head_ms[(head, label)]
        base = head_ms.get(("full", label), (h, total))[0]
        print(f"| {head} | {label} | {t:.2f} | {h:.2f} | {100 * h / total:.0f}% | {h / base:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "accuracy": acc,
            "latency_ms": {f"{h} / {label}": t for (h, label), t in ms.items()},
            "head_ms": {f"{h} / {label}": v for (h, label), v in head_ms.items()},
            "runs": args.runs, "size": list(size)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
