#!/usr/bin/env python3
"""Measure the shipped model's precision variants for the model card.

From the trained weights, builds the fp16 and both int8 ONNX variants (tensorrt and cpu
flavours) at the shipped fp32 ONNX's input size, evaluates every one on the CamVid val split
(mIoU, agreement with fp32) and times them on ONNX Runtime CPU side by side (round-robin, so
background load hits all alike), then prints a markdown table.

    python scripts/measure_precisions.py models/edge_m_camvid.onnx \\
        --weights models/edge_m_camvid.safetensors --data ../shared/data/camvid
    python scripts/measure_precisions.py models/edge_m_camvid.onnx --shipped   # the shipped variant files

Targets (issue 6): fp16 loses <= 0.1 mIoU points with >= 99.5% agreement; each int8 flavour
loses <= 1.0 point; the cpu int8 flavour runs >= 2.5x the fp32 throughput.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

SHIPPED = {"fp16": "fp16", "int8 cpu": "int8cpu"}  # table label -> shipped variant name
VARIANTS = (  # (label, precision, int8 target)
    ("fp16", "fp16", None),
    ("int8 tensorrt", "int8", "tensorrt"),
    ("int8 cpu", "int8", "cpu"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("onnx", help="the shipped fp32 ONNX (labels output), e.g. models/edge_m_camvid.onnx")
    p.add_argument("--weights", help="its safetensors weights (default: same name, .safetensors)")
    p.add_argument("--data", default="../shared/data/camvid", help="CamVid root (default ../shared/data/camvid)")
    p.add_argument("--split", default="val")
    p.add_argument("--calib-dir", help="calibration images (default DATA/train)")
    p.add_argument("--calib-images", type=int, default=100)
    p.add_argument("--calib-method", choices=["entropy", "percentile", "minmax"], default="entropy")
    p.add_argument("--runs", type=int, default=50, help="timed runs per variant (median; default 50)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: the runtime's default)")
    p.add_argument("--limit", type=int, default=0, help="evaluate on the first N images only (smoke runs)")
    p.add_argument("--keep", metavar="DIR", help="write the variants here (default: a temporary folder)")
    p.add_argument("--shipped", action="store_true",
                   help="measure the variant files shipped beside the ONNX (NAME.fp16.onnx, NAME.int8cpu.onnx) "
                        "instead of building them; the int8 tensorrt flavour is still built")
    p.add_argument("--json", metavar="FILE", help="also write the measurements as JSON")
    return p.parse_args(argv)


def build_variants(args: argparse.Namespace, out_dir: Path, meta) -> dict[str, Path]:
    from dilseg.export.quantize import export_variant
    from dilseg.export.torch_backend import weights_meta
    from dilseg.export.weights import load_model
    from dilseg.runtime.files import sha256_file

    weights = Path(args.weights or Path(args.onnx).with_suffix(".safetensors"))
    if not weights.is_file():
        sys.exit(f"error: weights {weights} not found; pass --weights")
    if meta.weights_sha256 and sha256_file(weights) != meta.weights_sha256:
        sys.exit(f"error: {weights} is not the file {args.onnx} was exported from (sha256 differs)")
    model, _ = load_model(weights)
    wmeta = weights_meta(weights, meta.input_size)
    calib = args.calib_dir or str(Path(args.data) / "train")
    paths = shipped_variants(args, meta) if args.shipped else {}
    for label, precision, target in VARIANTS:
        if label in paths:
            continue
        path = out_dir / f"{Path(args.onnx).stem}_{label.replace(' ', '_')}.onnx"
        print(f"building {label} -> {path}", file=sys.stderr)
        # The same head as the fp32 file, so the table compares precision alone.
        export_variant(model, wmeta, path, meta.input_size, precision, calib, args.calib_images,
                       target or "tensorrt", args.calib_method, head=meta.extra.get("head", "full"))
        paths[label] = path
    return {label: paths[label] for label, _, _ in VARIANTS}


def shipped_variants(args: argparse.Namespace, meta) -> dict[str, Path]:
    """The variant files beside the fp32 ONNX, each checked to name that file as its parent."""
    from dilseg.export.quantize import variant_path
    from dilseg.runtime.artifact import read_meta
    from dilseg.runtime.files import sha256_file

    parent_sha = sha256_file(args.onnx)
    paths = {}
    for label, variant in SHIPPED.items():
        path = variant_path(args.onnx, variant)
        if not path.is_file():
            sys.exit(f"error: --shipped: {path} not found (make it with scripts/make_variants.py)")
        if read_meta(path).extra.get("parent_sha256") != parent_sha:
            sys.exit(f"error: {path} was not made from {args.onnx} (parent sha256 differs); rebuild it")
        print(f"shipped {label}: {path}", file=sys.stderr)
        paths[label] = path
    return paths


def measure_accuracy(args: argparse.Namespace, models: dict[str, Path]) -> dict[str, dict]:
    from dilseg.runtime.backends import open_backend
    from dilseg.runtime.evaluate import dataset_for, verify

    reference = open_backend(models["fp32"])
    data = dataset_for(reference.meta, args.data, args.split)
    rows = {}
    for label, path in models.items():
        if label == "fp32":
            continue
        result = verify(reference, open_backend(path), data, args.limit or None, names=("fp32", label))
        rows["fp32"] = {"miou": 100 * result.reference_scores.miou, "agreement": 100.0, "delta": 0.0}
        rows[label] = {"miou": 100 * result.candidate_scores.miou, "agreement": result.agreement,
                       "delta": result.miou_delta}
    return rows


def measure_latency(args: argparse.Namespace, models: dict[str, Path]) -> dict[str, float]:
    """Median ms per inference, all variants interleaved run by run."""
    from dilseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from dilseg.runtime.dataset import open_images
    from dilseg.runtime.preprocess import preprocess

    backends = {label: OnnxRuntimeBackend(path, providers=["cpu"], threads=args.threads or None).load()
                for label, path in models.items()}
    frame = open_images(args.data, args.split).read_image(0)
    x = preprocess(frame, backends["fp32"].meta)
    for backend in backends.values():
        for _ in range(args.warmup):
            backend.infer(x)
    times = {label: [] for label in backends}
    for _ in range(args.runs):
        for label, backend in backends.items():
            t0 = time.perf_counter()
            backend.infer(x)
            times[label].append((time.perf_counter() - t0) * 1e3)
    return {label: statistics.median(t) for label, t in times.items()}


def table(rows: dict[str, dict], latency: dict[str, float], size: tuple[int, int], runs: int, threads: int) -> str:
    base = latency["fp32"]
    lines = [f"ONNX Runtime CPU, batch 1, {size[0]}x{size[1]}, median of {runs} runs, {threads} threads; "
             "mIoU and agreement on CamVid val.", "",
             "| variant | val mIoU % | Δ mIoU (points) | agreement with fp32 % | latency ms | FPS | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for label in ("fp32", *(v[0] for v in VARIANTS)):
        r, ms = rows[label], latency[label]
        lines.append(f"| {label} | {r['miou']:.2f} | {r['delta']:+.2f} | {r['agreement']:.2f} | {ms:.1f} | "
                     f"{1000 / ms:.1f} | {base / ms:.2f}x |")
    return "\n".join(lines)


def targets(rows: dict[str, dict], latency: dict[str, float]) -> list[str]:
    checks = [
        ("fp16 loses <= 0.1 points", -rows["fp16"]["delta"] <= 0.1),
        ("fp16 agreement >= 99.5%", rows["fp16"]["agreement"] >= 99.5),
        ("int8 tensorrt loses <= 1.0 point", -rows["int8 tensorrt"]["delta"] <= 1.0),
        ("int8 cpu loses <= 1.0 point", -rows["int8 cpu"]["delta"] <= 1.0),
        ("int8 cpu >= 2.5x fp32 throughput", latency["fp32"] / latency["int8 cpu"] >= 2.5),
    ]
    return [f"- {'met' if ok else 'MISSED'}: {name}" for name, ok in checks]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dilseg.runtime.artifact import read_meta
    from dilseg.runtime.backends.onnxruntime_backend import default_threads

    meta = read_meta(args.onnx)
    if meta.precision != "fp32" or meta.input_size is None:
        sys.exit(f"error: {args.onnx} must be an fp32 ONNX with a fixed input size (it is {meta.precision}, "
                 f"size {meta.input_size})")
    if args.runs < 1:
        sys.exit("error: --runs must be >= 1")
    with tempfile.TemporaryDirectory(prefix="dilseg-precisions-") as tmp:
        out_dir = Path(args.keep or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        models = {"fp32": Path(args.onnx), **build_variants(args, out_dir, meta)}
        rows = measure_accuracy(args, models)
        latency = measure_latency(args, models)
    threads = args.threads or default_threads()
    print(table(rows, latency, meta.input_size, args.runs, threads))
    print()
    print("\n".join(targets(rows, latency)))
    if args.json:
        Path(args.json).write_text(json.dumps({"accuracy": rows, "latency_ms": latency, "runs": args.runs,
                                               "threads": threads, "input_size": list(meta.input_size),
                                               "calibration": {"images": args.calib_images,
                                                               "method": args.calib_method}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
