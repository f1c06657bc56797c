"""The front-end study (Yu & Koltun's central claim at edge_m's size) from its run folders:
the table, and a picture of the same held-out frames segmented by (a) and (c).

    python scripts/frontend_study.py training/runs/edge_m_os32-base-0006R0 \\
        training/runs/edge_m_nocontext-base-0006R0 training/runs/edge_m-base-0006R0 \\
        training/runs/edge_m_large-base-0006R0 training/runs/edge_m_large_randinit-base-0006R0 \\
        --data ../shared/data/camvid --picture models/edge_m_frontend_study.png > study.md

Each folder's config.json names its model, and the model its row: (a) edge_m_os32, (b)
edge_m_nocontext, (c) edge_m, (d) edge_m_large, (d') edge_m_large_randinit. Per row: epochs
done of planned, held-out mIoU of the selected epoch and the classic val at that epoch
(best.json), the thin classes' held-out IoU, the training time (sum of log.csv's
epoch_seconds), GFLOPs at --size (torch's FLOP counter) and ONNX Runtime CPU latency at
--size. Latency: each variant's architecture exported with the full head (bilinear to the
input size, ArgMax there: the same head for stride 8 and 32), timed in alternating blocks in
this one run (only the ratios between rows mean anything on a shared machine; run it as a
benchmark, alone). ``--runs 0`` leaves latency out.

The picture (``--picture``): ``--frames`` frames evenly spaced over the held-out sequence of
the (a) run, each row the frame, its ground truth, and the labels of (a) and (c) from their
best.safetensors, for the model card.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/profile_model.py, imported where used

# model -> (row label, what differs); the order is the table's.
VARIANTS: dict[str, tuple[str, str]] = {
    "edge_m_os32": ("(a)", "output stride 32 (2x2 max pools where (b) dilates), no context, x32 bilinear"),
    "edge_m_nocontext": ("(b)", "dilated to output stride 8, no context, x8 bilinear"),
    "edge_m": ("(c)", "dilated, output stride 8, basic context (identity init)"),
    "edge_m_large": ("(d)", "dilated, output stride 8, large context (identity init)"),
    "edge_m_large_randinit": ("(d')", "as (d), context randomly (He) initialised"),
}
REFERENCE = "edge_m"  # (c): the shipped architecture; the other rows' difference is to it
THIN = ("Pole", "SignSymbol", "Fence", "Pedestrian")  # export/train.py's THIN_CLASSES


def read_run(folder: Path) -> dict:
    """The figures of one run folder (config.json, log.csv, best.json)."""
    if not (folder / "config.json").exists():
        raise SystemExit(f"{folder}: no config.json (not a dilseg train run folder)")
    config = json.loads((folder / "config.json").read_text())
    model = config.get("model", "")
    if model not in VARIANTS:
        raise SystemExit(f"{folder}: model {model!r} is not one of the study's ({', '.join(VARIANTS)})")
    log = list(csv.DictReader(open(folder / "log.csv"))) if (folder / "log.csv").exists() else []
    best = json.loads((folder / "best.json").read_text()) if (folder / "best.json").exists() else {}
    held = best.get("holdout", {})
    return {
        "folder": folder, "model": model, "label": VARIANTS[model][0], "what": VARIANTS[model][1],
        "holdout": config.get("holdout", ""), "epochs": config.get("epochs"), "epochs_done": len(log),
        "done": (folder / "DONE").exists() or len(log) == config.get("epochs"),
        "best_epoch": best.get("epoch"), "holdout_miou": held.get("miou", math.nan),
        "val_miou": best.get("val", {}).get("miou", math.nan),
        "thin": {c: held.get("iou", {}).get(c) for c in THIN},
        "train_seconds": sum(float(r["epoch_seconds"]) for r in log),
    }


def measure(models: list[str], size: tuple[int, int], runs: int, threads: int) -> dict[str, dict]:
    """GFLOPs and (runs > 0) ONNX Runtime median ms per model, at ``size``, side by side."""
    import torch

    from dilseg.export.zoo import create_model
    from profile_model import gflops, interleaved_medians

    figures: dict[str, dict] = {}
    for name in models:
        figures[name] = {"gflops": gflops(create_model(name).eval(), size), "ms": math.nan}
    if runs <= 0:
        return figures
    from dilseg.export.onnx_export import export_onnx
    from dilseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from dilseg.runtime.classes import PRESETS

    torch.set_num_threads(threads)
    x = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
    backends = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name in models:
                path = os.path.join(tmp, f"{name}.onnx")
                export_onnx(create_model(name).eval(), PRESETS["camvid"].model_meta(name, size), path, size, head="full")
                backends[name] = OnnxRuntimeBackend(path, threads=threads).load()
            ms = interleaved_medians({n: (lambda b=b: b.infer(x)) for n, b in backends.items()}, runs)
        finally:
            for backend in backends.values():
                backend.close()
    for name, value in ms.items():
        figures[name]["ms"] = value
    return figures


def table(rows: list[dict], figures: dict[str, dict], size: tuple[int, int]) -> str:
    """Markdown, rows in the study's order, differences to (c) on the same held-out sequence."""
    ref = {r["holdout"]: r["holdout_miou"] for r in rows if r["model"] == REFERENCE}
    order = list(VARIANTS)
    h, w = size
    lines = [f"| row | model | front-end / context | epochs done/planned | held-out mIoU % (epoch) | vs (c) | "
             f"classic val % (same epoch) | {' | '.join(THIN)} (held-out IoU %) | train s | GFLOPs @{h}x{w} | "
             f"ORT ms @{h}x{w} |",
             "|---|---|---|---|---|---|---|" + "---|" * len(THIN) + "---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["holdout"], order.index(r["model"]))):
        fig = figures.get(r["model"], {})
        state = "" if r["done"] else " (running)"
        lines.append(
            f"| {r['label']} | {r['model']} | {r['what']} | {r['epochs_done']}/{r['epochs']}{state} | "
            f"{_pct(r['holdout_miou'])} (ep {r['best_epoch']}) | "
            f"{_pct(r['holdout_miou'] - ref.get(r['holdout'], math.nan), signed=True)} | {_pct(r['val_miou'])} | "
            + " | ".join(_pct(r["thin"][c]) for c in THIN)
            + f" | {r['train_seconds']:.0f} | {_num(fig.get('gflops'), 2)} | {_num(fig.get('ms'), 1)} |")
    return "\n".join(lines) + "\n"


def _pct(v: float | None, signed: bool = False) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}"


def _num(v: float | None, digits: int) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.{digits}f}"


def held_out_frames(data: str, sequence: str, count: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``count`` (stem, BGR image, label) frames evenly spaced over ``sequence``'s frames."""
    from dilseg.export.train_data import make_split

    sets = make_split(data, sequence).holdout
    keys = [(d, i) for d in sets for i in range(len(d))]
    keys.sort(key=lambda k: k[0].samples[k[1]].stem)
    picks = sorted({int(round(v)) for v in np.linspace(0, len(keys) - 1, count)})
    return [(d.samples[i].stem, *d[i]) for d, i in (keys[j] for j in picks)]


def segment(weights: Path, images: list[np.ndarray]) -> list[np.ndarray]:
    """Labels at each image's own size, as the trainer's held-out evaluation computes them."""
    import torch

    from dilseg.export.torch_backend import weights_meta
    from dilseg.export.weights import load_model
    from dilseg.runtime.preprocess import normalize

    model, _ = load_model(weights)
    meta = weights_meta(weights)
    model.eval()
    with torch.no_grad():
        return [model(torch.from_numpy(normalize(im, meta))).argmax(1)[0].numpy() for im in images]


def colour(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """RGB picture of a label map; labels outside the palette (void) are black."""
    out = np.zeros((*labels.shape, 3), np.uint8)
    known = labels < len(palette)
    out[known] = palette[labels[known]]
    return out


def picture(rows: list[dict], data: str, path: Path, count: int) -> Path:
    """Frame | ground truth | (a) | (c) for ``count`` held-out frames; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dilseg.export.weights import read_weights_info, weights_classes
    from dilseg.runtime.classes import PRESETS
    from dilseg.runtime.files import atomic_write

    by_model = {r["model"]: r for r in rows}
    missing = [m for m in ("edge_m_os32", REFERENCE) if m not in by_model
               or not (by_model[m]["folder"] / "best.safetensors").exists()]
    if missing:
        raise SystemExit(f"--picture needs the (a) and (c) runs with their best.safetensors; missing: {', '.join(missing)}")
    a, c = by_model["edge_m_os32"], by_model[REFERENCE]
    if not a["holdout"]:
        raise SystemExit(f"{a['folder']}: not a --holdout run; the picture shows held-out frames")
    frames = held_out_frames(data, a["holdout"], count)
    images = [im for _, im, _ in frames]
    labels = {r["label"]: segment(r["folder"] / "best.safetensors", images) for r in (a, c)}
    classes = weights_classes(read_weights_info(c["folder"] / "best.safetensors")) or PRESETS["camvid"]
    palette = np.asarray(classes.palette, np.uint8)
    columns = [("frame", [im[..., ::-1] for im in images]), ("ground truth", [colour(g, palette) for _, _, g in frames])]
    for r in (a, c):
        columns.append((f"{r['label']} {r['model']}: held-out {_pct(r['holdout_miou'])} %",
                        [colour(lab, palette) for lab in labels[r["label"]]]))
    fig, axes = plt.subplots(len(frames), len(columns), figsize=(3.2 * len(columns), 2.5 * len(frames)), dpi=100,
                             squeeze=False)
    for i, (stem, _, _) in enumerate(frames):
        for j, (title, pictures) in enumerate(columns):
            ax = axes[i][j]
            ax.imshow(pictures[i])
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
            if j == 0:
                ax.set_ylabel(stem, fontsize=7)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=palette[i] / 255, label=name) for i, name in enumerate(classes.names)],
               loc="lower center", ncol=min(len(classes.names), 12), fontsize=7, frameon=False)
    fig.suptitle(f"held-out sequence {a['holdout']}: output stride 32 (a) vs dilated + context (c)", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    try:
        return int(h), int(w)
    except ValueError:
        raise SystemExit(f"--size must look like HxW (e.g. 360x480), got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="the study's run folders (config.json, log.csv, best.json)")
    ap.add_argument("--size", default="360x480", help="input size of GFLOPs and latency (default 360x480)")
    ap.add_argument("--runs", dest="timed_runs", type=int, default=30, metavar="N",
                    help="timed ONNX Runtime runs per model (default 30; 0: no latency)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime / torch threads")
    ap.add_argument("--picture", type=Path, help="write the (a) vs (c) picture here (PNG); needs --data")
    ap.add_argument("--data", help="dataset root the runs trained on (for --picture)")
    ap.add_argument("--frames", type=int, default=4, help="held-out frames in the picture (default 4)")
    args = ap.parse_args(argv)
    if args.picture and not args.data:
        ap.error("--picture needs --data (the held-out frames come from the dataset)")
    size = parse_size(args.size)
    rows = [read_run(folder) for folder in args.runs]
    models = [m for m in VARIANTS if any(r["model"] == m for r in rows)]
    figures = measure(models, size, args.timed_runs, args.threads)
    if args.timed_runs > 0:
        print(f"ONNX Runtime CPU latency: median of {args.timed_runs} runs per model in alternating blocks, "
              f"{args.threads} threads, head full, fresh weights (latency does not depend on them)\n")
    print(table(rows, figures, size), end="")
    if args.picture:
        print(f"\npicture: {picture(rows, args.data, args.picture, args.frames)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
