"""The ablation table of sequence-held-out runs, from their folders alone.

    python scripts/ablation_table.py training/runs/*/ > ablation.md
    python scripts/ablation_table.py --base-recipe "scale 0.75-1.5" training/runs/edge_m-*-0006R0/

Each row: the recipe switches that differ from the defaults (config.json), the held-out
sequence, epochs done of planned, the held-out mIoU of the selected epoch (best.json), its
difference to the base run on the same fold (the run whose switches are all off, or the
one named by --base), the classic val at that epoch, and the training time
(sum of log.csv's epoch_seconds, evaluation excluded).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

# Switches that make a recipe, with their off values (TrainConfig's defaults).
SWITCHES = {"scale": [0.75, 1.5], "photometric": False, "thin_sampling": 0.0, "ema": 0.0,
            "label_smoothing": 0.0, "ohem": 0.0}


def recipe(config: dict) -> str:
    parts = []
    for key, off in SWITCHES.items():
        value = config.get(key, off)
        if isinstance(value, (list, tuple)):
            value = list(value)
        if value != off:
            parts.append(key.replace("_", "-") if value is True else
                         f"{key.replace('_', '-')} {'-'.join(str(v) for v in value) if isinstance(value, list) else value}")
    return ", ".join(parts) or "base"


def row(run: Path) -> dict | None:
    if not (run / "config.json").exists() and not (run / "log.csv").exists():
        return None
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else _ckpt_config(run)
    log = list(csv.DictReader(open(run / "log.csv"))) if (run / "log.csv").exists() else []
    best = json.loads((run / "best.json").read_text()) if (run / "best.json").exists() else {}
    return {
        "name": run.name, "model": config.get("model", "?"), "recipe": recipe(config),
        "holdout": config.get("holdout", "") or best.get("holdout_sequence", ""),
        "epochs": config.get("epochs"), "epochs_done": len(log),
        "done": (run / "DONE").exists() or len(log) == config.get("epochs"),
        "holdout_miou": best.get("holdout", {}).get("miou", math.nan),
        "val_miou_at_best": best.get("val", {}).get("miou", math.nan), "best_epoch": best.get("epoch"),
        "train_seconds": sum(float(r["epoch_seconds"]) for r in log),
    }


def _ckpt_config(run: Path) -> dict:
    """Runs started before config.json existed keep their recipe in last.pt only."""
    if not (run / "last.pt").exists():
        return {}
    import torch

    return torch.load(run / "last.pt", map_location="cpu", weights_only=False).get("config", {})


def table(rows: list[dict], base: dict[str, str] | None = None) -> str:
    """Markdown; ``base`` maps a held-out sequence to the run name that is its reference."""
    refs = {}
    for r in rows:
        if base and r["holdout"] in base:
            if r["name"] == base[r["holdout"]]:
                refs[r["holdout"]] = r["holdout_miou"]
        elif r["recipe"] == "base" and r["holdout"] not in refs:
            refs[r["holdout"]] = r["holdout_miou"]
    lines = ["| run | model | recipe | held-out seq | epochs done/planned | held-out mIoU % | vs base | "
             "classic val % (same epoch) | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["holdout"], r["name"])):
        delta = r["holdout_miou"] - refs.get(r["holdout"], math.nan)
        state = "" if r["done"] else " (running)"
        lines.append(f"| {r['name']} | {r['model']} | {r['recipe']} | {r['holdout'] or '-'} | "
                     f"{r['epochs_done']}/{r['epochs']}{state} | {_pct(r['holdout_miou'])} (ep {r['best_epoch']}) | "
                     f"{_pct(delta, signed=True)} | {_pct(r['val_miou_at_best'])} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _pct(v: float, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (config.json, log.csv, best.json)")
    ap.add_argument("--base", action="append", default=[], metavar="SEQ=RUN",
                    help="the reference run of a fold (default: the run with every switch off)")
    args = ap.parse_args()
    base = dict(b.split("=", 1) for b in args.base)
    rows = [r for r in (row(Path(p)) for p in args.runs) if r]
    print(table(rows, base), end="")


if __name__ == "__main__":
    main()
