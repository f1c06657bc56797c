"""Segmentation metrics from a confusion matrix: per-class IoU, mIoU, pixel and class accuracy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class ConfusionMatrix:
    """Accumulates (ground truth, prediction) pixel counts, skipping the ignore label."""

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, truth: np.ndarray, pred: np.ndarray) -> None:
        if truth.shape != pred.shape:
            raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
        keep = truth < self.num_classes if self.ignore_index is None else truth != self.ignore_index
        t = truth[keep].astype(np.int64)
        p = pred[keep].astype(np.int64)
        if p.size and (p.min() < 0 or p.max() >= self.num_classes):
            raise ValueError(f"prediction holds class ids outside 0..{self.num_classes - 1}")
        self.matrix += np.bincount(t * self.num_classes + p, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )

    def scores(self) -> "Scores":
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        gt = m.sum(axis=1)
        pr = m.sum(axis=0)
        union = gt + pr - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            acc = np.where(gt > 0, tp / gt, np.nan)
        total = m.sum()
        return Scores(
            iou=iou,
            miou=float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            pixel_accuracy=float(tp.sum() / total) if total else float("nan"),
            class_accuracy=float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
            pixels=int(total),
        )


@dataclass
class Scores:
    iou: np.ndarray  # per class; NaN where a class is absent from both truth and prediction
    miou: float
    pixel_accuracy: float
    class_accuracy: float
    pixels: int
