#!/usr/bin/env python3
"""The CPU speed targets of the shipped model, measured side by side in one run.

1. End to end (dilseg's Pipeline: capture, preprocess, infer, postprocess, render; sink none),
   default `dilseg run` (`--backend auto`: the variant and backend autoselect.py picks here)
   against `--backend onnxruntime` on the fp32 edge_m_camvid.onnx, at 360x480 and 720x960
   frames, each run next to the raw inference of the same backend (back-to-back infer calls), in
   alternating rounds so that background load hits every contender alike.
2. Render at 720x960 (the output thread's drawing; p50 inside the pipeline).
3. Every precision on every installed CPU runtime: latency, FPS, GFLOP/s of the model's
   arithmetic (GFLOPs from the model card) and the fraction of that precision's measured roof:
   the model's commonest layer (3x3 conv, 128 -> 128 channels at 45x60, eight in a row) in the same
   runtime at the same precision, the best rate that runtime reaches on this CPU for such work.

    python scripts/bench_cpu.py                       # about 3 minutes
    python scripts/bench_cpu.py --rounds 3 --frames 100 --json cpu.json

Prints markdown tables and whether each target is met; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_model import interleaved_medians  # noqa: E402

from dilseg.runtime.autoselect import detect, pick  # noqa: E402
from dilseg.runtime.backends import open_backend  # noqa: E402
from dilseg.runtime.bench import bench  # noqa: E402
from dilseg.runtime.defaults import default_model_path  # noqa: E402
from dilseg.runtime.sources import open_source  # noqa: E402

ROOF_CHANNELS, ROOF_MAP, ROOF_LAYERS = 128, (45, 60), 8  # the roof's convolutions (see roof_graphs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(default_model_path()), help="an fp32 ONNX with variants (default: shipped)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of the end-to-end runs (median)")
    p.add_argument("--frames", type=int, default=150, help="measured frames per end-to-end run")
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--runs", type=int, default=60, help="timed inferences per precision (median)")
    p.add_argument("--only", choices=["e2e", "precisions"], help="run one of the two parts")
    p.add_argument("--json", metavar="FILE")
    return p.parse_args(argv)


# -- 1 and 2: end to end ---------------------------------------------------------------------

def end_to_end(args: argparse.Namespace, model: Path) -> dict:
    choice = pick(model)
    if choice is None:
        sys.exit(f"error: {model} has no variants beside it (scripts/make_variants.py makes them)")
    configs = {"default (auto)": (choice.path, choice.backend, choice.options),
               "onnxruntime fp32": (model, "onnxruntime", {})}
    backends = {name: open_backend(path, backend, **opts) for name, (path, backend, opts) in configs.items()}
    sizes = {"360x480": "480x360", "720x960": "960x720"}
    runs: dict[tuple[str, str], list] = {(n, s): [] for n in backends for s in sizes}
    for r in range(args.rounds):
        for size, wxh in sizes.items():
            for name, backend in backends.items():
                with open_source(f"test://{wxh}?live=0&frames={args.warmup + args.frames}") as source:
                    runs[(name, size)].append(bench(source, backend, args.frames, args.warmup))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    for backend in backends.values():
        backend.close()
    out = {"choice": choice.describe(), "rows": {}}
    for (name, size), results in runs.items():
        fps = statistics.median(b.pipeline["fps"] for b in results)
        raw = statistics.median(b.raw_fps for b in results)
        render = statistics.median(b.pipeline["stages_ms"]["render"]["p50"] for b in results)
        out["rows"][f"{name} @ {size}"] = {"e2e_fps": fps, "raw_fps": raw, "e2e_over_raw": fps / raw,
                                          "render_p50_ms": render,
                                          "e2e_fps_rounds": [round(b.pipeline["fps"], 2) for b in results]}
    return out


# -- 3: precisions and roofs -----------------------------------------------------------------

def roof_graphs() -> dict[str, bytes]:
    """The model's commonest layer, as large as it comes, repeated: eight 3x3 convolutions 128 ->
    128 channels on a 1x128x45x60 map (edge_m's dilated stages at 360x480; a chain, so layout
    reorders at its ends do not count), fp32 and in the QDQ int8 form of the cpu flavour (uint8
    activations, per-tensor int8 weights)."""
    from onnx import TensorProto, helper, numpy_helper

    c, (h, w) = ROOF_CHANNELS, ROOF_MAP
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((c, c, 3, 3)) * 0.05).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, w])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, h, w])
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    names = ["x", *(f"c{i}" for i in range(ROOF_LAYERS - 1)), "y"]
    fp32 = helper.make_graph([helper.make_node("Conv", [a, "w"], [b], **conv) for a, b in zip(names, names[1:])],
                             "convs", [x], [y], [numpy_helper.from_array(weight, "w")])
    # Activation zero point 0: OpenVINO's int8 convolutions pay for a non-zero one (measured on an
    # AVX2 CPU: 178 against 222-238 GFLOP/s), ONNX Runtime's do not; the roof is the best rate.
    q = [numpy_helper.from_array(np.array(0.02, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.uint8), "xz"),
         numpy_helper.from_array(np.array(0.001, np.float32), "ws"), numpy_helper.from_array(np.array(0, np.int8), "wz"),
         # 7-bit weights, as the shipped int8 variant has: on a CPU without VNNI runtimes pick
         # another kernel for 8-bit ones, and the roof would not be the model's own.
         numpy_helper.from_array(np.clip(weight * 1000, -64, 64).astype(np.int8), "wq")]
    names[-1] = "last"  # quantised too, so every convolution runs in int8
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"])]
    for a, b in zip(names, names[1:]):
        nodes += [helper.make_node("QuantizeLinear", [a, "xs", "xz"], [f"{b}_xq"]),
                  helper.make_node("DequantizeLinear", [f"{b}_xq", "xs", "xz"], [f"{b}_xd"]),
                  helper.make_node("Conv", [f"{b}_xd", "wd"], [b], **conv)]
    nodes += [helper.make_node("QuantizeLinear", ["last", "xs", "xz"], ["last_q"]),
              helper.make_node("DequantizeLinear", ["last_q", "xs", "xz"], ["y"])]
    int8 = helper.make_graph(nodes, "conv_int8", [x], [y], q)
    opset = [helper.make_opsetid("", 17)]
    return {"fp32": helper.make_model(fp32, opset_imports=opset).SerializeToString(),
            "int8": helper.make_model(int8, opset_imports=opset).SerializeToString()}


def roof_gflop() -> float:
    return ROOF_LAYERS * 2 * ROOF_CHANNELS * ROOF_CHANNELS * 9 * ROOF_MAP[0] * ROOF_MAP[1] / 1e9


def precisions(args: argparse.Namespace, model: Path, machine) -> dict:
    import onnxruntime as ort

    from dilseg.runtime.artifact import read_meta
    from dilseg.runtime.preprocess import normalize

    files = {"fp32": model, "int8": model.with_name(f"{model.stem}.int8cpu.onnx"),
             "fp16": model.with_name(f"{model.stem}.fp16.onnx")}
    contenders = [("onnxruntime", "fp32", {}), ("onnxruntime", "int8", {}), ("onnxruntime", "fp16", {})]
    if "openvino" in machine.packages:
        contenders += [("openvino", "fp32", {"ov_precision": "f32"}), ("openvino", "fp32", {"ov_precision": "bf16"}),
                       ("openvino", "int8", {"ov_precision": "f32"})]
    meta = read_meta(model)
    x = normalize(np.full((*meta.input_size, 3), 128, np.uint8), meta)
    fns, labels, backends = {}, {}, []
    for backend_name, variant, opts in contenders:
        extra = {"log": lambda _: None} if backend_name == "openvino" else {}
        be = open_backend(files[variant], backend_name, **opts, **extra)
        backends.append(be)
        prec = opts.get("ov_precision", "f32") if variant == "fp32" else variant
        label = f"{backend_name} {variant}" + (f" at {prec}" if backend_name == "openvino" and variant == "fp32" else "")
        fns[label] = lambda b=be: b.infer(x)
        labels[label] = "int8" if variant == "int8" else ("bf16" if prec == "bf16" else
                                                          ("fp16" if variant == "fp16" else "fp32"))
    graphs = roof_graphs()
    xg = np.random.default_rng(1).standard_normal((1, ROOF_CHANNELS, *ROOF_MAP)).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the ONNX Runtime backend runs
    roof_fns = {}
    for kind in ("fp32", "int8"):
        sess = ort.InferenceSession(graphs[kind], so, providers=["CPUExecutionProvider"])
        roof_fns[f"onnxruntime {kind}"] = lambda s=sess: s.run(None, {"x": xg})
    if "openvino" in machine.packages:
        from dilseg.runtime.backends.openvino_backend import shared_core

        core = shared_core()
        for kind, prec in (("fp32", "f32"), ("bf16", "bf16"), ("int8", "f32")):
            graph = graphs["int8" if kind == "int8" else "fp32"]
            req = core.compile_model(core.read_model(graph, b""), "CPU",
                                     {"INFERENCE_PRECISION_HINT": prec, "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
            roof_fns[f"openvino {kind}"] = lambda r=req: r.infer({0: xg})
    ms = interleaved_medians({**fns, **{f"roof {k}": f for k, f in roof_fns.items()}}, args.runs)
    for be in backends:
        be.close()
    card = json.loads(model.with_suffix(".metrics.json").read_text()) if model.with_suffix(".metrics.json").is_file() \
        else {}
    gflops = float(card.get("gflops_360x480", 0.0))
    rows = {}
    for label, kind in labels.items():
        runtime = label.split()[0]
        roof_key = f"roof {runtime} {'fp32' if kind == 'fp16' and runtime == 'onnxruntime' else kind}"
        roof = roof_gflop() / (ms[roof_key] * 1e-3) if roof_key in ms else float("nan")
        rate = gflops / (ms[label] * 1e-3) if gflops else float("nan")
        rows[label] = {"ms": ms[label], "fps": 1000 / ms[label], "gflops_per_s": rate, "roof_gflops_per_s": roof,
                       "fraction_of_roof": rate / roof, "roof": roof_key.removeprefix("roof ")}
    return {"gflops": gflops, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = Path(args.model)
    machine = detect()
    t0 = time.time()
    e2e = end_to_end(args, model) if args.only != "precisions" else None
    prec = precisions(args, model, machine) if args.only != "e2e" else None
    print(f"CPU: {machine.describe()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"{pick(model).describe()}")
    print(f"{time.time() - t0:.0f} s in all")
    if prec:
        print()
        print(f"| runtime, precision | ms | FPS | GFLOP/s ({prec['gflops']} GFLOPs) | measured roof GFLOP/s | of roof |")
        print("|---|---|---|---|---|---|")
        for label, r in prec["rows"].items():
            print(f"| {label} | {r['ms']:.1f} | {r['fps']:.1f} | {r['gflops_per_s']:.0f} | "
                  f"{r['roof_gflops_per_s']:.0f} ({r['roof']}) | {100 * r['fraction_of_roof']:.0f}% |")
    if not e2e:
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine.describe(), "precisions": prec}, indent=2) + "\n")
        return 0
    print()
    print(f"{args.rounds} alternating rounds of {args.frames} frames (+{args.warmup} warm-up); test:// frames; "
          "sink none, overlay rendered")
    print()
    print("| path @ frame size | end-to-end FPS | raw inference FPS | e2e / raw | render p50 ms |")
    print("|---|---|---|---|---|")
    for name, r in e2e["rows"].items():
        print(f"| {name} | {r['e2e_fps']:.1f} | {r['raw_fps']:.1f} | {r['e2e_over_raw']:.2f} | {r['render_p50_ms']:.2f} |")
    rows = e2e["rows"]
    speedup = rows["default (auto) @ 360x480"]["e2e_fps"] / rows["onnxruntime fp32 @ 360x480"]["e2e_fps"]
    checks = [
        (f"default run >= 2.0x the end-to-end FPS of --backend onnxruntime fp32 at 360x480: {speedup:.2f}x",
         speedup >= 2.0),
        *((f"pipeline >= 0.9x raw inference, default @ {s}: {rows[f'default (auto) @ {s}']['e2e_over_raw']:.2f}",
           rows[f"default (auto) @ {s}"]["e2e_over_raw"] >= 0.9) for s in ("360x480", "720x960")),
        (f"render <= 3 ms at 720x960: {rows['default (auto) @ 720x960']['render_p50_ms']:.2f} ms",
         rows["default (auto) @ 720x960"]["render_p50_ms"] <= 3.0),
    ]
    print()
    print("\n".join(f"- {'met' if ok else 'MISSED'}: {text}" for text, ok in checks))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine.describe(), "end_to_end": e2e, "precisions": prec,
                                               "speedup_360x480": speedup}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
