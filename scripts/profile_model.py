"""Size and speed of a zoo model: parameters, GFLOPs at a given input size, and ONNX Runtime
CPU latency vs PyTorch eager measured side by side in one run.

    python scripts/profile_model.py --model edge_m --size 360x480 --runs 50
    python scripts/profile_model.py --model edge_m --onnx models/edge_m_camvid.onnx

Prints a markdown table; nothing is asserted (benchmarks print, tests assert).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dilseg.export.onnx_export import export_onnx, parse_size
from dilseg.export.train import camvid_meta
from dilseg.export.zoo import create_model
from dilseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend


def gflops(model: torch.nn.Module, size: tuple[int, int]) -> float:
    """Forward GFLOPs (2 x multiply-accumulates) counted by torch's own FLOP counter."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, *size))
    return counter.get_total_flops() / 1e9


def median_ms(fn, runs: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="edge_m")
    ap.add_argument("--size", default="360x480")
    ap.add_argument("--onnx", help="time this ONNX instead of a fresh export of the model")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    size = parse_size(args.size)
    torch.set_num_threads(args.threads)
    model = create_model(args.model).eval()
    params = sum(p.numel() for p in model.parameters())
    flops = gflops(model, size)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.onnx
        if not path:
            path = os.path.join(tmp, "m.onnx")
            export_onnx(model, camvid_meta(args.model, size), path, size)
        backend = OnnxRuntimeBackend(path, threads=args.threads).load()
        x = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
        xt = torch.from_numpy(x)
        with torch.no_grad():
            # Same input, alternating blocks, one process: the ratio is what matters on a shared box.
            ort_ms = median_ms(lambda: backend.infer(x), args.runs)
            torch_ms = median_ms(lambda: model(xt).argmax(1), args.runs)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads={args.threads}")
    print("| model | params | GFLOPs @%dx%d | ONNX Runtime CPU ms (FPS) | PyTorch eager ms | ORT speed-up |" % size)
    print("|---|---|---|---|---|---|")
    print(f"| {args.model} | {params / 1e6:.2f} M | {flops:.2f} | {ort_ms:.1f} ({1000 / ort_ms:.1f}) | {torch_ms:.1f} "
          f"| {torch_ms / ort_ms:.2f}x |")


if __name__ == "__main__":
    main()
