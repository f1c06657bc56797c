"""Train a zoo model from scratch on a labelled dataset folder (CamVid layout).

Everything needed to resume lives in ``OUT/last.pt`` (model, EMA, optimizer, epoch, RNG
state, config); ``OUT/best.safetensors`` holds the weights with the best selection mIoU,
``OUT/best.json`` their per-class scores, ``OUT/config.json`` the recipe and
``OUT/log.csv`` one row per epoch; ``OUT/DONE`` appears when the schedule has run out.

Selection: with ``holdout`` (a whole sequence held out, train and val frames of it), the
held-out sequence picks the best epoch and the classic val split is only reported; its
frames sit one second between training frames, so it measures memory of the street more
than generalisation. Without a holdout, val selects (the classic protocol); when val is
trained on, nothing selects and the last epoch is the result (fixed epoch count).

Recipe: random scale, crop and flip; optional photometric jitter, rare-class crops, label
smoothing, OHEM and an EMA of the weights; class weights from the training labels (ENet's
1/ln(1.02 + p)); AdamW with a linear warm-up and a poly schedule.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dilseg.runtime.classes import PRESETS
from dilseg.runtime.dataset import SegmentationDataset
from dilseg.runtime.errors import DilsegError
from dilseg.runtime.files import atomic_write
from dilseg.runtime.metadata import ModelMeta
from dilseg.runtime.metrics import ConfusionMatrix
from dilseg.runtime.preprocess import normalize

from .augment import Photometric
from .losses import segmentation_loss
from .train_config import TrainConfig
from .train_data import CropDataset, EpochSampler, Split, load_pairs, make_split, thin_pixels, worker_init
from .weights import save_weights
from .zoo import create_model

THIN_CLASSES = ("Pole", "SignSymbol", "Fence", "Pedestrian")
RUN_FILES = ("log.csv", "last.pt", "best.safetensors", "last.safetensors", "best.json", "config.json", "DONE")
# Settings that define what a run measures: resuming under other values would mix two runs.
FIXED_ON_RESUME = ("model", "holdout", "train_splits", "seed")
PER_INVOCATION = ("out", "data", "threads", "workers", "stop_after")  # free to change between sessions


class TrainError(DilsegError, ValueError):
    """A training run that cannot start as asked (the message says what to change)."""


def class_weights(labels: list[np.ndarray], num_classes: int, ignore: int) -> np.ndarray:
    """ENet's weighting 1 / ln(1.02 + p_class): rare classes count more, bounded at ~50x."""
    counts = np.zeros(num_classes, np.float64)
    for lab in labels:
        valid = lab[lab != ignore]
        counts += np.bincount(valid.ravel(), minlength=num_classes)[:num_classes]
    p = counts / max(counts.sum(), 1)
    return (1.0 / np.log(1.02 + p)).astype(np.float32)


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    total = cfg.epochs * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(0.0, 1 - (step - warm) / max(1, total - warm)) ** cfg.poly_power


@torch.no_grad()
def evaluate(model: torch.nn.Module, pairs: list[tuple[np.ndarray, np.ndarray]], meta: ModelMeta,
             device: torch.device, num_classes: int, ignore: int, amp: bool = False,
             channels_last: bool = False) -> ConfusionMatrix:
    """Confusion matrix at the frames' own resolution (CamVid frames are the model input size)."""
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore)
    for image, label in pairs:
        x = torch.from_numpy(normalize(image, meta)).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(x).argmax(1)[0].cpu().numpy()
        cm.update(label, pred)
    return cm


def prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to replace an existing run unless asked to continue or to start over."""
    if resume and overwrite:
        raise TrainError("--resume continues a run and --overwrite starts it over: pass one of them")
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out}: exists and is not a folder; pass --out a run folder")
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not resume and not overwrite:
        raise TrainError(f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                         "--overwrite to start it over (replaces those files), or another --out")
    if overwrite:
        for name in existing:
            (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """last.pt as a dict, or a TrainError that names the file and what to do."""
    fix = f"pass --overwrite to start the run over, or restore {path.name} from a copy (git checkout of the run folder)"
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # truncated zip, pickle garbage, wrong format: all the same to the user
        raise TrainError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                         f"{fix}") from None
    needed = ("model", "optimizer", "epoch", "best_miou", "config")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        what = "a bare state dict" if isinstance(ckpt, dict) and all(torch.is_tensor(v) for v in ckpt.values()) \
            else "not a dilseg training checkpoint"
        raise TrainError(f"{path}: {what} (needs {', '.join(needed)}); to train from weights alone start a new run; "
                         f"{fix}")
    return ckpt


def _load_state(module, state: dict, path: Path, what: str) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0] if first else "")
        raise TrainError(f"{path}: its {what} does not fit this run ({detail[:160]}); pass --overwrite to start over, "
                         "or the --model the run was made with") from None


class Run:
    """Model, optimizer, EMA and bookkeeping of one training run."""

    def __init__(self, cfg: TrainConfig, num_classes: int, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.model = create_model(cfg.model, num_classes).to(device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = None
        if cfg.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            # use_buffers: BatchNorm statistics are averaged too, so the EMA model runs as is.
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
        self.start_epoch, self.best = 0, -1.0

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def state(self, epoch: int) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "epoch": epoch,
                "best_miou": self.best, "torch_rng": torch.get_rng_state(), "config": asdict(self.cfg),
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path, self.device)
        old = ckpt["config"]
        for key in FIXED_ON_RESUME:
            mine, theirs = getattr(self.cfg, key), old.get(key, getattr(TrainConfig, key, None))
            if isinstance(mine, tuple):
                theirs = tuple(theirs) if theirs is not None else theirs
            if theirs != mine:
                raise TrainError(f"{path} is a {key}={theirs} run, not {key}={mine}; pass the same --{key.replace('_', '-')}, "
                                 "or a new --out to start another run" if key != "model" else
                                 f"{path} is a {theirs} run, not {mine}; pass the same --model, or a new --out to start "
                                 "another run")
        changed = {f.name: (old[f.name], getattr(self.cfg, f.name)) for f in fields(TrainConfig)
                   if f.name in old and f.name not in PER_INVOCATION
                   and _norm(old[f.name]) != _norm(getattr(self.cfg, f.name))}
        if changed:
            # The schedule and recipe are functions of these: resuming with new ones bends the curve.
            print("note: resuming with changed settings " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()),
                  flush=True)
        _load_state(self.model, ckpt["model"], path, "model")
        _load_state(self.opt, ckpt["optimizer"], path, "optimizer state")
        if self.ema is not None:
            if ckpt.get("ema") is not None:
                _load_state(self.ema, ckpt["ema"], path, "EMA")
            else:
                print("note: the checkpoint has no EMA; the EMA starts from the current weights", flush=True)
                self.ema.module.load_state_dict(self.model.state_dict())
        self.start_epoch, self.best = ckpt["epoch"] + 1, ckpt["best_miou"]
        torch.set_rng_state(ckpt["torch_rng"].cpu())  # a CPU ByteTensor, even when mapped to a GPU


def _norm(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def _loader(cfg: TrainConfig, pairs: list, meta: ModelMeta, ignore: int, num_classes: int,
            device: torch.device) -> tuple[DataLoader, EpochSampler]:
    thin = None
    if cfg.thin_sampling:
        ids = tuple(meta.classes.index(c) for c in THIN_CLASSES if c in meta.classes)
        thin = thin_pixels([lab for _, lab in pairs], ids, seed=cfg.seed)
    photo = Photometric() if cfg.photometric else None
    data = CropDataset(pairs, meta, cfg.crop, cfg.scale, ignore, cfg.seed, photo, thin)
    sampler = EpochSampler(len(pairs), cfg.seed, thin, cfg.thin_sampling)
    # Drop the ragged last batch: a batch of one breaks BatchNorm's statistics.
    drop_last = len(pairs) > cfg.batch_size
    loader = DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        drop_last=drop_last, persistent_workers=cfg.workers > 0, worker_init_fn=worker_init,
                        multiprocessing_context="spawn" if cfg.workers else None,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if cfg.workers else None)
    return loader, sampler


def _log_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _scores_json(cm: ConfusionMatrix, classes: tuple[str, ...]) -> dict:
    s = cm.scores()
    return {"miou": s.miou, "iou": {c: (None if math.isnan(v) else float(v)) for c, v in zip(classes, s.iou)}}


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    out = Path(cfg.out)
    prepare_out(out, resume, overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop and frame sizes: pick the fastest kernels once
    torch.manual_seed(cfg.seed)

    split: Split = make_split(cfg.data, cfg.holdout, cfg.train_splits)
    ref: SegmentationDataset = split.train[0]
    num_classes, ignore = ref.num_classes, ref.ignore_index
    classes = ref.classes or PRESETS["camvid"]  # a classes file at the root, Cityscapes' 19, else CamVid's
    # Exports of these weights take their classes, colours and void label from this header.
    header = {"palette": json.dumps([list(c) for c in classes.palette]), "ignore_index": str(ignore)}
    pairs = load_pairs(split.train, cfg.max_train_images)
    holdout_pairs = load_pairs(split.holdout, cfg.max_val_images)
    val_pairs = load_pairs(split.val, cfg.max_val_images)
    selector = "holdout" if holdout_pairs else ("val" if val_pairs else "")
    print(f"training on {len(pairs)} frames of {', '.join(cfg.train_splits)}"
          + (f" without sequence {cfg.holdout}" if cfg.holdout else "")
          + (f"; held-out {cfg.holdout}: {len(holdout_pairs)} frames" if holdout_pairs else "")
          + (f"; classic val: {len(val_pairs)} frames" if val_pairs else "")
          + (f"; selecting on {selector}" if selector else "; no selection (fixed epoch count, last weights)"),
          flush=True)
    weights = torch.from_numpy(class_weights([p[1] for p in pairs], num_classes, ignore)).to(device)
    meta = replace(classes.model_meta(cfg.model), ignore_index=ignore)
    loader, sampler = _loader(cfg, pairs, meta, ignore, num_classes, device)
    steps_per_epoch = len(loader)

    run = Run(cfg, num_classes, device)
    ckpt_path, log_path = out / "last.pt", out / "log.csv"
    if resume and ckpt_path.exists():
        run.restore(ckpt_path)
        print(f"resumed {ckpt_path} at epoch {run.start_epoch} (best {selector or 'val'} mIoU {run.best:.4f})", flush=True)
    elif resume:
        print(f"no checkpoint at {ckpt_path}; starting from scratch", flush=True)
    if run.start_epoch == 0 and log_path.exists():
        log_path.unlink()  # --resume without last.pt: the log belongs to no checkpoint
    if run.start_epoch == 0 or not (out / "config.json").exists():
        # The recipe beside the results, readable without torch (model cards quote it).
        text = json.dumps({**asdict(cfg), "train_frames": len(pairs), "holdout_frames": len(holdout_pairs),
                           "val_frames": len(val_pairs), "selected_on": selector}, indent=1) + "\n"
        atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(text))

    last = min(cfg.epochs, cfg.stop_after) if cfg.stop_after else cfg.epochs
    for epoch in range(run.start_epoch, last):
        run.model.train()
        sampler.set_epoch(epoch)
        t0 = time.time()
        total_loss, seen, lr = 0.0, 0, cfg.lr
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False)
        for s, (x, y) in enumerate(bar):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            lr = lr_at(cfg, epoch * steps_per_epoch + s, steps_per_epoch)
            for group in run.opt.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                logits = run.model(x)
            loss = segmentation_loss(logits.float(), y, weights, ignore, cfg.label_smoothing, cfg.ohem)
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            run.opt.step()
            if run.ema is not None:
                run.ema.update_parameters(run.model)
            total_loss += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        train_time = time.time() - t0
        scores = {"holdout": float("nan"), "val": float("nan")}
        cms = {}
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            for name, data in (("holdout", holdout_pairs), ("val", val_pairs)):
                if data:
                    cms[name] = evaluate(run.eval_model, data, meta, device, num_classes, ignore, cfg.amp,
                                         cfg.channels_last)
                    scores[name] = cms[name].scores().miou
        info = {"epoch": str(epoch + 1)}
        if selector and selector in cms and scores[selector] > run.best:
            run.best = scores[selector]
            save_weights(run.eval_model, out / "best.safetensors", cfg.model, classes.names, **header,
                         selected_on=selector, **{f"{k}_miou": f"{v:.4f}" for k, v in scores.items() if not math.isnan(v)},
                         **info, holdout=cfg.holdout)
            report = {"epoch": epoch + 1, "selected_on": selector, "holdout_sequence": cfg.holdout,
                      **{k: _scores_json(cm, classes.names) for k, cm in cms.items()}}
            atomic_write(out / "best.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))
        save_weights(run.eval_model, out / "last.safetensors", cfg.model, classes.names, **header, **info)
        atomic_write(ckpt_path, lambda tmp: torch.save(run.state(epoch), tmp))
        _log_row(log_path, {"epoch": epoch + 1, "train_loss": f"{total_loss / max(seen, 1):.5f}",
                            "holdout_miou": f"{scores['holdout']:.5f}", "val_miou": f"{scores['val']:.5f}",
                            "lr": f"{lr:.6g}", "epoch_seconds": f"{train_time:.1f}"})
        shown = " ".join(f"{k} mIoU {v:.4f}" for k, v in scores.items() if not math.isnan(v))
        print(f"epoch {epoch + 1}/{cfg.epochs} loss {total_loss / max(seen, 1):.4f} {shown or 'not evaluated'}"
              + (f" (best {selector} {run.best:.4f})" if selector else "") + f" {train_time:.0f}s", flush=True)
    if last < cfg.epochs:
        print(f"stopping after epoch {last} of {cfg.epochs}; continue with --resume", flush=True)
    else:
        # The schedule has run out: resuming adds nothing (a longer one is a new run).
        note = f"{cfg.epochs} epochs; best {selector or 'none'} mIoU {run.best:.4f}; {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
        atomic_write(out / "DONE", lambda tmp: Path(tmp).write_text(note))
    return out / ("best.safetensors" if selector else "last.safetensors")
