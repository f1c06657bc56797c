"""A training run's settings, torch-free, so the CLI's defaults are these fields' defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    model: str = "edge_m"
    data: str = "../shared/data/camvid"
    out: str = "training/runs/edge_m"
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
    workers: int = 0  # augmenting DataLoader worker processes (0: in the main process)
    val_every: int = 1
    max_train_images: int = 0  # 0: all; small values for smoke tests
    max_val_images: int = 0
    holdout: str = ""  # a sequence to hold out (selects the best epoch); "" = classic val selects
    train_splits: tuple[str, ...] = ("train",)
    photometric: bool = False
    thin_sampling: float = 0.0  # chance a crop is centred on a thin class (THIN_CLASSES)
    label_smoothing: float = 0.0
    ohem: float = 0.0  # keep pixels whose true-class probability is below this (0: off)
    ema: float = 0.0  # EMA decay per step (0: off); EMA weights are evaluated and saved
    stop_after: int = 0  # stop after this epoch (the schedule still runs to ``epochs``); 0: run to the end
    amp: bool = False  # bf16 autocast (CUDA)
    channels_last: bool = False
