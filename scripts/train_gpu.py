"""The whole training plan on one GPU within a wall-clock budget: the ablation on the
sequence-held-out protocol, then the final train+val weights with the recipe it picked.

    python3 scripts/train_gpu.py --data DIR --out OUT --budget 540        # H200, 16 cores
    python3 scripts/train_gpu.py --data DIR --out OUT --smoke             # any CPU, 5-10 min

Phase 0 (probe) runs a few epochs of the base recipe in ``--jobs`` processes at once and
measures the throughput (run-epochs per second); from it the epoch count E is chosen so the
plan fits the budget. Phase A trains the ablation (each recipe change alone on fold 0006R0,
all of them together, the same at 2E epochs, base/strong on the other two folds, and the
front-end study: edge_m_os32, edge_m_nocontext, edge_m_large and edge_m_large_randinit with
the base recipe at E epochs, whose basic-context row is the base run) in ``--jobs``
concurrent processes. The recipe with the best held-out mIoU on fold 0006R0 is
chosen; phase B trains edge_m and edge_s on train+val with it for a fixed epoch count (no
selection: the last weights). Every run is a `dilseg train` process with its own run folder,
so a run cut off by the deadline still leaves its checkpoint and log.

Writes OUT/summary.md (ablation table: held-out and classic val mIoU, train time; the
front-end study's table, scripts/frontend_study.py, without latency),
OUT/summary.json, OUT/runs/<name>/ (log.csv, best.json, weights) and OUT/driver.log.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ablation_table.py (run with -P)
from ablation_table import row as table_row, table as markdown_table  # noqa: E402
from frontend_study import measure as study_measure, read_run as study_run, table as study_table  # noqa: E402

STRONG = ["--scale", "0.5-2.0", "--photometric", "--thin-sampling", "0.25", "--ema", "0.998"]
BASE = ["--scale", "0.75-1.5"]  # the round-1 recipe: scale/crop/flip only
SINGLES = {
    "base": BASE,
    "photometric": [*BASE, "--photometric"],
    "wide-scale": ["--scale", "0.5-2.0"],
    "thin-sampling": [*BASE, "--thin-sampling", "0.25"],
    "ema": [*BASE, "--ema", "0.998"],
    "label-smoothing": [*BASE, "--label-smoothing", "0.1"],
    "ohem": [*BASE, "--ohem", "0.7"],
    "strong": STRONG,
}
# Training frames per fold (CamVid train split without the held-out sequence), relative cost.
FOLD_FRAMES = {"0006R0": 266, "0001TP": 305, "0016E5": 163}
TRAINVAL_FRAMES = 468
# The front-end study (training/README.md, step 8): run name -> zoo model, each with the base
# recipe on fold 0006R0 at E epochs; the base run is its basic-context row (edge_m) at equal budget.
STUDY = {"edge_m_os32": "edge_m_os32", "edge_m_nocontext": "edge_m_nocontext", "edge_m_large": "edge_m_large",
         "edge_m_large_randinit": "edge_m_large_randinit"}
STUDY_ROWS = ["edge_m_os32", "edge_m_nocontext", "base", "edge_m_large", "edge_m_large_randinit"]
FINAL_SCHEDULE = 2  # the final runs train for FINAL_SCHEDULE * E epochs when the long run wins


@dataclass
class Job:
    name: str
    args: list[str]
    epochs: int
    frames: int
    phase: str
    recipe: str = ""
    holdout: str = ""
    proc: subprocess.Popen | None = None
    started: float = 0.0
    ended: float = 0.0
    rc: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def cost(self) -> float:
        return self.epochs * self.frames / FOLD_FRAMES["0006R0"]


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        (self.out / "runs").mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.e = 0
        self.deadline = self.t0 + args.budget
        self.log_file = open(self.out / "driver.log", "a")
        self.cuda = _cuda()
        cores = os.cpu_count() or 2
        # The main processes mostly wait on the GPU: about two augmenting workers per job.
        self.workers = args.workers if args.workers >= 0 else max(1, round((cores - args.jobs / 2) / args.jobs))
        self.log(f"cuda: {self.cuda}; cores {cores}; jobs {args.jobs}; workers per job {self.workers}; "
                 f"budget {args.budget:.0f}s")

    def log(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def command(self, job: Job, workers: int) -> list[str]:
        a = self.args
        cmd = [sys.executable, "-P", "-m", "dilseg.runtime.cli", "train", "--data", a.data,
               "--out", str(self.out / "runs" / job.name), "--epochs", str(job.epochs), "--workers", str(workers),
               "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--val-every", str(a.val_every),
               "--threads", "1", *job.args]
        if self.cuda:
            cmd += ["--amp", "--channels-last"]
        if a.smoke:
            cmd += ["--max-train-images", "8", "--max-val-images", "4", "--crop", "96x128"]
        return cmd

    def run_all(self, jobs: list[Job], concurrency: int, deadline: float) -> None:
        """Run jobs, ``concurrency`` at a time, killing what is still running at ``deadline``."""
        pending, running = list(jobs), []
        workers = self.workers if concurrency >= self.args.jobs else \
            max(1, round(((os.cpu_count() or 2) - concurrency / 2) / concurrency))
        while pending or running:
            while pending and len(running) < concurrency:
                job = pending.pop(0)
                folder = self.out / "runs" / job.name
                folder.mkdir(parents=True, exist_ok=True)
                log = open(folder / "train.log", "w")
                job.proc = subprocess.Popen(self.command(job, workers), stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "TQDM_DISABLE": "1"})
                job.started = time.time()
                running.append(job)
                self.log(f"start {job.name} ({job.epochs} epochs, {workers} workers)")
            time.sleep(0.5)
            for job in list(running):
                if job.proc.poll() is not None:
                    job.rc, job.ended = job.proc.returncode, time.time()
                    running.remove(job)
                    self.log(f"done {job.name} rc {job.rc} in {job.ended - job.started:.0f}s")
            if time.time() > deadline:
                for job in running:
                    job.proc.kill()
                    job.proc.wait()
                    job.rc, job.ended = -9, time.time()
                    self.log(f"deadline: killed {job.name} (its last checkpoint stays)")
                for job in pending:
                    self.log(f"deadline: not started {job.name}")
                return

    def probe(self) -> float:
        """Run-epochs (of fold 0006R0's size) per second with --jobs processes at once."""
        epochs = 2 if self.args.smoke else 4
        jobs = [Job(f"probe-{i}", [*BASE, "--holdout", "0006R0", "--seed", str(i)], epochs,
                    FOLD_FRAMES["0006R0"], "probe") for i in range(self.args.jobs)]
        start = time.time()
        self.run_all(jobs, self.args.jobs, self.deadline)
        # Throughput from the epochs alone: process start-up (CUDA, decoding the frames) is
        # paid once per run and counted separately.
        per_epoch = []
        startup = []
        for job in jobs:
            rows = read_log(self.out / "runs" / job.name)
            if job.rc != 0 or len(rows) < epochs:
                raise SystemExit(f"probe {job.name} failed (rc {job.rc}); see {self.out / 'runs' / job.name / 'train.log'}")
            per_epoch.append((job.ended - job.started) / epochs)
            startup.append(job.ended - job.started - sum(float(r["epoch_seconds"]) for r in rows))
        wall = time.time() - start
        rate = self.args.jobs * epochs / max(1e-6, wall - max(startup))
        self.startup = max(startup)
        self.log(f"probe: {wall:.0f}s wall, start-up up to {self.startup:.0f}s per run, "
                 f"{rate:.2f} run-epochs/s at {self.args.jobs} jobs")
        return rate

    def plan_a(self, e: int) -> list[Job]:
        jobs = [Job(name, [*args, "--holdout", "0006R0"], e, FOLD_FRAMES["0006R0"], "A", name, "0006R0")
                for name, args in SINGLES.items()]
        jobs.append(Job("strong-long", [*STRONG, "--holdout", "0006R0"], FINAL_SCHEDULE * e, FOLD_FRAMES["0006R0"],
                        "A", "strong-long", "0006R0"))
        for fold in ("0001TP", "0016E5"):
            for recipe in ("strong", "base"):
                jobs.append(Job(f"{recipe}-{fold}", [*SINGLES[recipe], "--holdout", fold], e, FOLD_FRAMES[fold],
                                "A", recipe, fold))
        if not self.args.skip_study:
            # recipe = the model name: not a recipe, so never the one phase B picks.
            jobs += [Job(name, [*BASE, "--model", model, "--holdout", "0006R0"], e, FOLD_FRAMES["0006R0"], "A",
                         model, "0006R0") for name, model in STUDY.items()]
        # Longest first: the last wave is not one long run on an idle GPU.
        return sorted(jobs, key=lambda j: -j.cost)

    def plan_b(self, recipe: str, epochs: int) -> list[Job]:
        args = SINGLES[recipe] if recipe in SINGLES else STRONG
        return [Job(f"final-{model}", [*args, "--model", model, "--train-splits", "train,val"], epochs,
                    TRAINVAL_FRAMES, "B", recipe) for model in ("edge_m", "edge_s")]

    def main(self) -> int:
        rate = self.probe()
        left = self.deadline - time.time()
        # Fold-epochs per epoch of E, from the plan itself (the study's runs included).
        cost_a = sum(job.cost for job in self.plan_a(1))
        cost_b = 2 * FINAL_SCHEDULE * TRAINVAL_FRAMES / FOLD_FRAMES["0006R0"]
        waves = math.ceil(len(self.plan_a(1)) / self.args.jobs) + 1
        # Phase B runs 2 jobs where the probe ran --jobs: its throughput is assumed the same
        # (augmentation on the CPU bounds it; each run then gets more workers).
        usable = self.args.safety * (left - waves * self.startup)
        e = int(usable * rate / (cost_a + cost_b))
        e = max(self.args.min_epochs, min(self.args.max_epochs, e))
        self.e = e
        self.log(f"plan: E = {e} epochs (cost {cost_a:.1f}E + {cost_b:.1f}E fold-epochs, {left:.0f}s left)")
        jobs_a = self.plan_a(e)
        share_a = cost_a / (cost_a + cost_b)
        self.run_all(jobs_a, self.args.jobs, time.time() + share_a * left)
        table = self.summarise(jobs_a)
        fold = [r for r in table if r["holdout"] == "0006R0" and r["recipe"] in SINGLES and r["finished"]]
        if not fold:
            self.log("no ablation run finished; no final runs")
            self.write(table, None, [])
            return 1
        best = max(fold, key=lambda r: r["holdout_miou"])
        long_row = next((r for r in table if r["name"] == "strong-long" and r["finished"]), None)
        strong_row = next((r for r in fold if r["recipe"] == "strong"), None)
        longer = bool(long_row and strong_row and long_row["holdout_miou"] > strong_row["holdout_miou"]
                      and best["recipe"] == "strong")
        final_epochs = e * (FINAL_SCHEDULE if longer else 1)
        choice = {"recipe": best["recipe"], "epochs": final_epochs, "held_out_miou": best["holdout_miou"],
                  "longer_schedule": longer}
        self.log(f"chosen: {choice}")
        jobs_b = self.plan_b(best["recipe"], final_epochs)
        self.run_all(jobs_b, 2, self.deadline)
        self.write(table, choice, self.summarise(jobs_b))
        return 0 if all(j.rc == 0 for j in jobs_b) else 1

    def summarise(self, jobs: list[Job]) -> list[dict]:
        rows = []
        for job in jobs:
            folder = self.out / "runs" / job.name
            log = read_log(folder)
            best = json.loads((folder / "best.json").read_text()) if (folder / "best.json").exists() else {}
            done = len(log)
            last_val = [float(r["val_miou"]) for r in log if r["val_miou"] != "nan"]
            rows.append({
                "name": job.name, "recipe": job.recipe, "holdout": job.holdout, "epochs": job.epochs,
                "epochs_done": done, "finished": job.rc == 0 and done == job.epochs,
                "holdout_miou": best.get("holdout", {}).get("miou", float("nan")),
                "best_epoch": best.get("epoch"),
                "val_miou_at_best": best.get("val", {}).get("miou", float("nan")),
                "val_miou_last": last_val[-1] if last_val else float("nan"),
                "holdout_iou": best.get("holdout", {}).get("iou", {}),
                "train_seconds": sum(float(r["epoch_seconds"]) for r in log),
                "wall_seconds": (job.ended - job.started) if job.ended else float("nan"),
                "args": job.args,
            })
        return rows

    def write(self, table: list[dict], choice: dict | None, finals: list[dict]) -> None:
        summary = {"ablation": table, "choice": choice, "finals": finals, "cuda": self.cuda,
                   "elapsed_seconds": time.time() - self.t0, "smoke": self.args.smoke}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        rows = [r for r in (table_row(self.out / "runs" / t["name"]) for t in table) if r]
        lines = [f"# GPU training plan ({'smoke, ' if self.args.smoke else ''}{self.cuda or 'cpu'})", "",
                 f"E = {self.e} epochs; batch {self.args.batch_size}, lr {self.args.lr}; "
                 f"train s = sum of epoch times with {self.args.jobs} runs sharing the machine.", "",
                 markdown_table(rows, {"0006R0": "base", "0001TP": "base-0001TP", "0016E5": "base-0016E5"})]
        study = [self.out / "runs" / name for name in STUDY_ROWS if (self.out / "runs" / name / "config.json").exists()]
        if not self.args.skip_study and study:
            lines += ["", "## Front-end study (fold 0006R0, base recipe, E epochs each; (c) is the base run)", ""]
            try:
                runs = [study_run(folder) for folder in study]
                lines.append(study_table(runs, study_measure([r["model"] for r in runs], (360, 480), 0, 1), (360, 480)))
            except (Exception, SystemExit) as exc:  # the table is a summary: it must not cost the rest of it
                lines.append(f"study table failed: {type(exc).__name__}: {exc}")
                self.log(f"study table failed: {exc}")
        lines += ["", f"chosen: {json.dumps(choice)}", ""]
        for r in finals:
            lines.append(f"final {r['name']}: {r['epochs_done']}/{r['epochs']} epochs, finished {r['finished']}, "
                         f"train {r['train_seconds']:.0f}s")
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")
        self.log("wrote " + str(self.out / "summary.md"))


def read_log(folder: Path) -> list[dict]:
    path = folder / "log.csv"
    return list(csv.DictReader(open(path))) if path.exists() else []


def _cuda() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CamVid root (train/, val/)")
    ap.add_argument("--out", required=True, help="results folder")
    ap.add_argument("--budget", type=float, default=540, help="wall-clock seconds for everything (default 540)")
    ap.add_argument("--jobs", type=int, default=6, help="training processes at once in the probe and phase A")
    ap.add_argument("--workers", type=int, default=-1, help="augmenting workers per process (default: cores/jobs)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=4.2e-3, help="peak LR (3e-3 at batch 8, scaled by sqrt(2))")
    ap.add_argument("--val-every", type=int, default=5)
    ap.add_argument("--safety", type=float, default=0.8, help="fraction of the estimated time to plan for")
    ap.add_argument("--min-epochs", type=int, default=20)
    ap.add_argument("--max-epochs", type=int, default=400)
    ap.add_argument("--smoke", action="store_true", help="tiny data and epochs: checks the plan runs end to end")
    ap.add_argument("--skip-study", action="store_true", help="leave the front-end study's four runs out of phase A")
    args = ap.parse_args()
    if args.smoke:
        # Every phase must run to its end: on a busy CPU the process start-ups alone can
        # outlast a GPU-sized budget.
        args.jobs, args.min_epochs, args.max_epochs, args.val_every = 2, 1, 2, 1
        args.budget = max(args.budget, 1800)
    return Driver(args).main()


if __name__ == "__main__":
    sys.exit(main())
