"""Size and speed of a zoo model: parameters, GFLOPs at a given input size, and ONNX Runtime
CPU latency vs PyTorch eager measured side by side in one run.

    python scripts/profile_model.py --model edge_m --size 360x480 --runs 50
    python scripts/profile_model.py --model edge_m --onnx models/edge_m_camvid.onnx
    python scripts/profile_model.py --model edge_s,edge_m,edge_l   # width trade-off, one run

Prints a markdown table; nothing is asserted (benchmarks print, tests assert).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dilseg.export.onnx_export import export_onnx, parse_size
from dilseg.runtime.classes import PRESETS
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


def interleaved_medians(fns: dict[str, object], runs: int, warmup: int = 5, block: int = 10) -> dict[str, float]:
    """Median ms of each function, timed in alternating blocks so background load on a shared
    box hits every contender alike (ratios from one run are what this script reports).

    Blocks rather than single calls: PyTorch's OpenMP workers spin for a while after each call
    and would steal the cores from whatever runs next, so the first call of each block is
    discarded and only the block's settled calls count.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(math.ceil(runs / block)):
        for name, fn in fns.items():
            fn()  # settles the other contender's spinning threads
            for _ in range(min(block, runs - len(times[name]))):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="edge_m", help="zoo name, or several comma-separated (edge_s,edge_m,edge_l)")
    ap.add_argument("--size", default="360x480")
    ap.add_argument("--onnx", help="time this ONNX instead of a fresh export (one --model only)")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    size = parse_size(args.size)
    names = [n.strip() for n in args.model.split(",") if n.strip()]
    if args.onnx and len(names) != 1:
        ap.error("--onnx goes with exactly one --model")
    torch.set_num_threads(args.threads)
    x = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
    xt = torch.from_numpy(x)
    models, backends, fns = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name in names:
            model = create_model(name).eval()
            path = args.onnx or os.path.join(tmp, f"{name}.onnx")
            if not args.onnx:
                export_onnx(model, PRESETS["camvid"].model_meta(name, size), path, size)
            backend = OnnxRuntimeBackend(path, threads=args.threads).load()
            models[name], backends[name] = model, backend
            fns[f"{name} ort"] = lambda b=backend: b.infer(x)
            fns[f"{name} torch"] = lambda m=model: m(xt).argmax(1)
        ms = interleaved_medians(fns, args.runs)
        for backend in backends.values():
            backend.close()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads={args.threads}, "
          f"median of {args.runs} runs in alternating blocks")
    print("| model | params | GFLOPs @%dx%d | ONNX Runtime CPU ms (FPS) | PyTorch eager ms | ORT speed-up |" % size)
    print("|---|---|---|---|---|---|")
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        ort_ms, torch_ms = ms[f"{name} ort"], ms[f"{name} torch"]
        print(f"| {name} | {params / 1e6:.2f} M | {gflops(model, size):.2f} | {ort_ms:.1f} ({1000 / ort_ms:.1f}) "
              f"| {torch_ms:.1f} | {torch_ms / ort_ms:.2f}x |")


if __name__ == "__main__":
    main()
