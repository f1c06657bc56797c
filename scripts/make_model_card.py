"""Write the shipped model's card from what can be measured: architecture, size, the
training log, per-class val IoU and ONNX Runtime CPU latency on the CPU it runs on.

    python scripts/make_model_card.py --run runs/edge_m --onnx models/edge_m_camvid.onnx \
        --data ../shared/data/camvid --train-command "dilseg train ..."

With ``--fold RUN`` (repeatable: the sequence-held-out runs of the same recipe, see
training/README.md) the card adds per-class IoU on each held-out sequence and their mean,
which is what predicts unseen footage; the classic val sits between training frames.

Writes models/<stem>.md, models/<stem>_curve.png and models/<stem>.metrics.json (the
figures the CI guards read). Everything it prints is measured in this run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

from dilseg.export.weights import load_model, read_weights_info
from dilseg.runtime.files import atomic_write
from dilseg.runtime.dataset import SegmentationDataset
from dilseg.runtime.backends import open_backend
from dilseg.runtime.evaluate import evaluate

from profile_model import gflops, median_ms  # scripts/ sibling


def plot_curve(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in log]
    fig, ax1 = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax1.plot(epochs, [float(r["train_loss"]) for r in log], color="tab:blue", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss (weighted CE)", color="tab:blue")
    ax2 = ax1.twinx()
    for column, colour, label in (("val_miou", "tab:red", "classic val"), ("holdout_miou", "tab:green", "held-out sequence")):
        points = [(e, 100 * float(r[column])) for e, r in zip(epochs, log) if r.get(column, "nan") != "nan"]
        if points:
            ax2.plot(*zip(*points), color=colour, label=f"{label} mIoU")
    ax2.set_ylabel("CamVid mIoU (%)", color="tab:red")
    ax2.legend(loc="lower right", fontsize=8)
    ax1.set_title("edge model on CamVid train (from scratch)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def fold_table(runs: list[Path]) -> dict:
    """Per-class IoU of each held-out sequence's best epoch (best.json), and the mean mIoU."""
    if not runs:
        return {}
    reports = []
    for run in runs:
        report = json.loads((run / "best.json").read_text())
        if not report.get("holdout_sequence"):
            raise SystemExit(f"{run}: not a sequence-held-out run (trained without --holdout)")
        reports.append(report)
    names = list(reports[0]["holdout"]["iou"])
    head = "| class | " + " | ".join(f"{r['holdout_sequence']} held out" for r in reports) + " |"
    lines = ["## Held-out sequences (unseen footage)",
             "Each column: trained without that sequence, scored on all its frames (train and val), at the epoch",
             "the held-out score selected. The classic val above sits one second between training frames.", "",
             head, "|---|" + "---|" * len(reports)]
    for c in names:
        cells = [r["holdout"]["iou"][c] for r in reports]
        lines.append(f"| {c} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in cells) + " |")
    per_seq = {r["holdout_sequence"]: r["holdout"]["miou"] for r in reports}
    mean = float(np.mean(list(per_seq.values())))
    lines.append("| **mIoU** | " + " | ".join(f"**{100 * v:.2f}**" for v in per_seq.values()) + " |")
    lines += ["", f"Mean over the held-out sequences: **{100 * mean:.2f}%** "
                  f"(epochs selected: {', '.join(str(r['epoch']) for r in reports)})."]
    return {"mean": mean, "per_sequence": per_seq, "markdown": "\n".join(lines)}


def write_text(path: Path, text: str) -> None:
    """The CI guards read these files: complete or absent."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="training run folder (log.csv, best.safetensors)")
    ap.add_argument("--weights", help="shipped weights (default RUN/best.safetensors)")
    ap.add_argument("--onnx", required=True, help="shipped ONNX")
    ap.add_argument("--data", required=True)
    ap.add_argument("--train-command", required=True)
    ap.add_argument("--runs", type=int, default=100, help="latency runs (median reported)")
    ap.add_argument("--fold", action="append", default=[], metavar="RUN",
                    help="a sequence-held-out run of the same recipe (best.json, config.json); repeatable")
    ap.add_argument("--section", action="append", default=[], metavar="MD",
                    help="markdown file appended to the card (e.g. the width and precision tables, "
                         "each with the command that measured it); repeatable")
    args = ap.parse_args()
    run, onnx_path = Path(args.run), Path(args.onnx)
    weights = Path(args.weights or run / "best.safetensors")
    stem = onnx_path.with_suffix("")
    log = list(csv.DictReader(open(run / "log.csv")))
    info = read_weights_info(weights)
    model, _ = load_model(weights)
    params = sum(p.numel() for p in model.parameters())
    flops = gflops(model.eval(), (360, 480))

    backend = open_backend(onnx_path)
    result = evaluate(backend, SegmentationDataset(args.data, "val"), name=onnx_path.name)
    x = np.random.default_rng(0).standard_normal((1, 3, 360, 480)).astype(np.float32)
    latency = median_ms(lambda: backend.infer(x), args.runs, warmup=10)
    backend.close()

    plot_curve(log, Path(f"{stem}_curve.png"))
    scores = result.to_dict()
    metrics = {"val_miou": scores["miou"], "val_pixel_accuracy": scores["pixel_accuracy"],
               "val_class_accuracy": scores["class_accuracy"], "val_iou": scores["iou"],
               "ort_cpu_latency_ms_360x480": round(latency, 2), "params": params, "gflops_360x480": round(flops, 2),
               "best_epoch": int(info.get("epoch", 0)), "epochs": len(log), "machine": f"{cpu_name()}, {os.cpu_count()} cores"}
    write_text(Path(f"{stem}.metrics.json"), json.dumps(metrics, indent=2) + "\n")

    folds = fold_table([Path(f) for f in args.fold])
    if folds:
        metrics["heldout_miou_mean"] = folds["mean"]
        metrics["heldout_miou"] = folds["per_sequence"]
        write_text(Path(f"{stem}.metrics.json"), json.dumps(metrics, indent=2) + "\n")
    rows = "\n".join(f"| {name} | {iou:.1f} |" for name, iou in scores["iou"].items())
    scored = [r for r in log if r["val_miou"] != "nan"] or log
    best = max(scored, key=lambda r: float(r["val_miou"]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    card = f"""# {stem.name}: the shipped default model

A CamVid 11-class segmentation model for real-time use on CPUs, Jetsons and desktop GPUs,
trained from scratch by this project (no ImageNet pre-training, no external weights).

## Architecture (`edge_m` in `export/edge.py`)
- stem: 3x3 conv stride 2 (24 ch) -> 3x3 conv stride 2 (48 ch)
- residual basic block stride 2 (96 ch, output stride 8) -> block dilation 2 (128 ch) -> block dilation 4 (128 ch)
- degridding (DRN-C): 3x3 dilation 2 -> 3x3 dilation 1, no residuals
- 1x1 to 11 classes -> Yu & Koltun basic context module (dilations 1,1,2,4,8,16,1,1; identity init)
- bilinear x8 upsampling (one ONNX Resize) -> ArgMax -> int32 labels in the graph
- {params / 1e6:.2f} M parameters, {flops:.2f} GFLOPs at 360x480 (torch.utils.flop_counter; 1 MAC = 2 FLOPs)

Input: 1x3x360x480 RGB, (pixel/255 - ImageNet mean) / std; output: 1x360x480 int32 class ids.
All of this is in the ONNX metadata (`dilseg info {onnx_path.name}`).

## Training
```
{args.train_command}
```
CamVid train (367 frames), {len(log)} epochs, batch 8, random scale 0.75-1.5, crop 320x416,
horizontal flip, ENet class weights 1/ln(1.02+p), AdamW (lr 3e-3, weight decay 1e-4), 2 warm-up
epochs then poly decay (power 0.9), seed 0, on a CPU: {metrics['machine']}.
The shipped weights are the epoch with the best val mIoU (epoch {best['epoch']}); selection used val only.

![training curve]({stem.name}_curve.png)

## CamVid val (101 frames, 360x480, void ignored), shipped ONNX through the runtime
`dilseg eval --model models/{onnx_path.name} --data ../shared/data/camvid --split val`

| class | IoU % |
|---|---|
{rows}

mIoU **{scores['miou']:.2f}%**, pixel accuracy {scores['pixel_accuracy']:.2f}%, class-average accuracy {scores['class_accuracy']:.2f}%.

## Speed
ONNX Runtime CPU, batch 1, 360x480, median of {args.runs} runs after warm-up: **{latency:.1f} ms
({1000 / latency:.1f} FPS)** on {metrics['machine']} (shared VM; measured by
`python scripts/make_model_card.py`, commit {commit}).
`python scripts/profile_model.py --model edge_m --onnx models/{onnx_path.name}` reproduces it
next to PyTorch eager.
"""
    if folds:
        card += "\n" + folds["markdown"] + "\n"
    for section in args.section:
        card += "\n" + Path(section).read_text().strip() + "\n"
    write_text(Path(f"{stem}.md"), card)
    print(card)


if __name__ == "__main__":
    main()
