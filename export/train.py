"""Train a zoo model from scratch on a labelled dataset folder (CamVid layout).

Everything needed to resume lives in ``OUT/last.pt`` (model, optimizer, epoch, RNG state);
``OUT/best.safetensors`` holds the weights with the best val mIoU and ``OUT/log.csv`` one
row per epoch. Random scale, crop and flip; class weights from the training labels (ENet's
1/ln(1.02 + p)); AdamW with a linear warm-up and a poly schedule.
"""

from __future__ import annotations

import csv
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dilseg.runtime.dataset import CAMVID_CLASSES, CAMVID_IGNORE, SegmentationDataset
from dilseg.runtime.metadata import ModelMeta
from dilseg.runtime.metrics import ConfusionMatrix
from dilseg.runtime.preprocess import normalize

from dilseg.runtime.files import atomic_write

from .weights import save_weights
from .zoo import create_model


class TrainError(ValueError):
    """A training run that cannot start as asked (the message says what to change)."""


@dataclass
class TrainConfig:
    model: str = "edge_m"
    data: str = "../shared/data/camvid"
    out: str = "runs/edge_m"
    epochs: int = 60
    batch_size: int = 8
    crop: tuple[int, int] = (320, 416)  # (H, W) training crop
    scale: tuple[float, float] = (0.75, 1.5)  # random rescale range
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    poly_power: float = 0.9
    seed: int = 0
    threads: int = 0  # 0: torch's default
    val_every: int = 1
    max_train_images: int = 0  # 0: all; small values for smoke tests
    max_val_images: int = 0


def class_weights(labels: list[np.ndarray], num_classes: int, ignore: int) -> np.ndarray:
    """ENet's weighting 1 / ln(1.02 + p_class): rare classes count more, bounded at ~50x."""
    counts = np.zeros(num_classes, np.float64)
    for lab in labels:
        valid = lab[lab != ignore]
        counts += np.bincount(valid.ravel(), minlength=num_classes)[:num_classes]
    p = counts / max(counts.sum(), 1)
    return (1.0 / np.log(1.02 + p)).astype(np.float32)


def augment(image: np.ndarray, label: np.ndarray, crop: tuple[int, int], scale: tuple[float, float],
            ignore: int, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """Random scale, random crop (padding with the void label where the image is small), flip."""
    s = rng.uniform(*scale)
    h, w = label.shape
    nh, nw = max(8, int(h * s + 0.5)), max(8, int(w * s + 0.5))
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST)
    ch, cw = crop
    ph, pw = max(0, ch - nh), max(0, cw - nw)
    if ph or pw:
        image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=0)
        label = cv2.copyMakeBorder(label, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=ignore)
    y = rng.randint(0, image.shape[0] - ch)
    x = rng.randint(0, image.shape[1] - cw)
    image, label = image[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def camvid_meta(model_name: str, input_size: tuple[int, int] | None = (360, 480)) -> ModelMeta:
    from dilseg.runtime.dataset import CAMVID_PALETTE

    return ModelMeta(model=model_name, classes=CAMVID_CLASSES, palette=CAMVID_PALETTE,
                     input_size=input_size, ignore_index=CAMVID_IGNORE)


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    total = cfg.epochs * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * (1 - (step - warm) / max(1, total - warm)) ** cfg.poly_power


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: SegmentationDataset, meta: ModelMeta, device: torch.device,
             limit: int = 0) -> float:
    """Val mIoU at the dataset's own resolution (CamVid frames are the model input size)."""
    model.eval()
    cm = ConfusionMatrix(data.num_classes, data.ignore_index)
    for i in range(min(limit or len(data), len(data))):
        image, label = data[i]
        x = torch.from_numpy(normalize(image, meta)).to(device)
        pred = model(x).argmax(1)[0].cpu().numpy()
        cm.update(label, pred)
    return cm.scores().miou


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    train_set = SegmentationDataset(cfg.data, "train")
    val_set = SegmentationDataset(cfg.data, "val")
    # Preload: the whole of CamVid train is ~190 MB of pixels; JPEG decoding every epoch
    # would cost as much as a small model's forward pass on this 2-core machine.
    n = len(train_set) if not cfg.max_train_images else min(cfg.max_train_images, len(train_set))
    pairs = [train_set[i] for i in tqdm(range(n), desc="loading train", unit="img")]
    weights = torch.from_numpy(class_weights([p[1] for p in pairs], train_set.num_classes, train_set.ignore_index)).to(device)
    meta = camvid_meta(cfg.model)

    model = create_model(cfg.model, train_set.num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    start_epoch, best = 0, -1.0
    ckpt_path = out / "last.pt"
    log_path = out / "log.csv"
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt["config"]["model"] != cfg.model:
            raise TrainError(f"{ckpt_path} is a {ckpt['config']['model']} run, not {cfg.model}; "
                             "pass the same --model, or a new --out to start another run")
        changed = {k: (v, getattr(cfg, k)) for k, v in ckpt["config"].items()
                   if k in ("epochs", "lr", "batch_size", "crop", "weight_decay") and v != getattr(cfg, k, v)}
        if changed:
            # The schedule is a function of these: resuming with new ones bends the curve.
            print("note: resuming with changed settings " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()),
                  flush=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch, best = ckpt["epoch"] + 1, ckpt["best_miou"]
        rng.setstate(ckpt["py_rng"])
        torch.set_rng_state(ckpt["torch_rng"].cpu())  # a CPU ByteTensor, even when mapped to a GPU
        print(f"resumed {ckpt_path} at epoch {start_epoch} (best val mIoU {best:.4f})", flush=True)
    elif resume:
        print(f"no checkpoint at {ckpt_path}; starting from scratch", flush=True)
    if start_epoch == 0 and log_path.exists():
        log_path.unlink()

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.time()
        order = list(range(n))
        rng.shuffle(order)
        total_loss, seen = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False)
        for s in bar:
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            batch = [augment(*pairs[i], cfg.crop, cfg.scale, train_set.ignore_index, rng) for i in idx]
            x = torch.from_numpy(np.concatenate([normalize(img, meta) for img, _ in batch])).to(device)
            y = torch.from_numpy(np.stack([lab for _, lab in batch]).astype(np.int64)).to(device)
            lr = lr_at(cfg, epoch * steps_per_epoch + s, steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(model(x), y, weight=weights, ignore_index=train_set.ignore_index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        train_time = time.time() - t0
        miou = float("nan")
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            miou = evaluate(model, val_set, meta, device, cfg.max_val_images)
        if miou > best:
            best = miou
            save_weights(model, out / "best.safetensors", cfg.model, CAMVID_CLASSES, epoch=str(epoch + 1), val_miou=f"{miou:.4f}")
        save_weights(model, out / "last.safetensors", cfg.model, CAMVID_CLASSES, epoch=str(epoch + 1))
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "best_miou": best,
                 "py_rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "config": asdict(cfg)}
        atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))
        new = not log_path.exists()
        with open(log_path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["epoch", "train_loss", "val_miou", "lr", "epoch_seconds"])
            w.writerow([epoch + 1, f"{total_loss / max(seen, 1):.5f}", f"{miou:.5f}", f"{lr:.6g}", f"{train_time:.1f}"])
        print(f"epoch {epoch + 1}/{cfg.epochs} loss {total_loss / max(seen, 1):.4f} val mIoU {miou:.4f} "
              f"(best {best:.4f}) {train_time:.0f}s", flush=True)
    return out / "best.safetensors"
