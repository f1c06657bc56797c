"""Measure artifacts on data: `dilseg eval` (one model vs ground truth) and `dilseg verify`
(a candidate vs a reference, e.g. int8 vs fp32).

Every artifact runs through runtime.segmenter, the same preprocess -> backend -> postprocess
chain `dilseg run` uses, so the numbers are those of the deployed path. Predictions are
compared at the dataset's own resolution.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .artifact import WEIGHTS_SUFFIX, artifact_suffix
from .backends import Backend, open_backend
from .dataset import DEFAULT_VOID, DatasetError, Images, SegmentationDataset, check_same_classes, open_images
from .errors import DilsegError
from .files import atomic_write_bytes
from .metadata import ModelMeta
from .metrics import ConfusionMatrix, Scores
from .segmenter import Segmenter


class VerifyError(DilsegError, ValueError):
    """Two artifacts cannot be compared, or a threshold needs data that is not there."""


def dataset_for(meta: ModelMeta, root: str | Path, split: str | None, labelled: bool = True) -> Images:
    """The images (and labels, where there are) a model is measured on, checked against its class count."""
    ignore = meta.ignore_index if meta.ignore_index is not None else DEFAULT_VOID
    data = open_images(root, split, meta.num_classes, ignore)
    if getattr(data, "classes", None) is not None:  # the dataset names its classes: they must be the model's
        check_same_classes(meta.classes, data.classes, data.classes.source)
    if labelled and not isinstance(data, SegmentationDataset):
        raise DatasetError(f"{root}: found images but no labels/ folder; `dilseg eval` needs a labelled dataset "
                           "(images/ + labels/ matched by stem), `dilseg verify` also takes plain images")
    return data


def known_ids(labels: np.ndarray, meta: ModelMeta, name: str) -> np.ndarray:
    """``labels``, refused in one line when they hold a class id the model's metadata does not list
    (its class list is wrong or the graph is not the one it describes): no score means anything then."""
    top = int(labels.max()) if labels.size else 0
    if top >= meta.num_classes:
        raise VerifyError(f"{name}: the model predicts class id {top}, but its metadata lists {meta.num_classes} "
                          f"classes (ids 0..{meta.num_classes - 1}); its class list does not match the graph: "
                          "re-export it, or re-import it with `dilseg import --classes` listing every class")
    return labels


def percent(x: float) -> float | None:
    """Fractions -> percent for people and JSON; NaN (class absent everywhere) -> None."""
    return None if x is None or not math.isfinite(x) else round(100.0 * float(x), 4)


def scores_dict(scores: Scores, classes: tuple[str, ...]) -> dict:
    return {
        "miou": percent(scores.miou),
        "pixel_accuracy": percent(scores.pixel_accuracy),
        "class_accuracy": percent(scores.class_accuracy),
        "iou": {name: percent(v) for name, v in zip(classes, scores.iou)},
        "pixels": scores.pixels,
    }


@dataclass
class EvalResult:
    model: str
    meta: ModelMeta
    scores: Scores
    images: int
    confusion: np.ndarray

    def to_dict(self) -> dict:
        return {"model": self.model, "architecture": self.meta.model, "precision": self.meta.precision,
                "units": "percent", "images": self.images, **scores_dict(self.scores, self.meta.classes),
                "confusion": self.confusion.tolist()}


def frames(data: Images, limit: int | None, desc: str,
           progress: bool) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(image, label | None) in order, with a progress bar; ``limit`` takes the first N."""
    n = len(data) if not limit else min(limit, len(data))
    for i in tqdm(range(n), desc=desc, unit="img", disable=not progress, leave=False):
        yield data[i]


def evaluate(backend: Backend, data: SegmentationDataset, limit: int | None = None, progress: bool = True,
             name: str | None = None) -> EvalResult:
    """Per-class IoU, mIoU, pixel and class-average accuracy of one artifact, void ignored."""
    meta = backend.meta
    if data.num_classes != meta.num_classes:
        raise DatasetError(f"the dataset is read with {data.num_classes} classes, the model has {meta.num_classes}")
    segment = Segmenter(backend)
    cm = ConfusionMatrix(meta.num_classes, data.ignore_index)
    count = 0
    for image, label in frames(data, limit, f"eval {name or meta.model}", progress):
        cm.update(label, known_ids(segment(image).labels, meta, name or meta.model))
        count += 1
    return EvalResult(name or meta.model, meta, cm.scores(), count, cm.matrix.copy())


def check_comparable(ref: ModelMeta, cand: ModelMeta, ref_name: str, cand_name: str) -> None:
    """Agreement is only meaningful when class i means the same thing on both sides."""
    if ref.num_classes != cand.num_classes:
        raise VerifyError(f"class counts differ: {ref_name} predicts {ref.num_classes} classes, "
                          f"{cand_name} {cand.num_classes}; compare artifacts of the same model")
    if tuple(ref.classes) != tuple(cand.classes):
        diff = next(i for i, (a, b) in enumerate(zip(ref.classes, cand.classes)) if a != b)
        raise VerifyError(f"class lists differ at id {diff}: {ref_name} has {ref.classes[diff]!r}, "
                          f"{cand_name} has {cand.classes[diff]!r}")


@dataclass
class VerifyResult:
    reference: str
    candidate: str
    classes: tuple[str, ...]
    images: int
    pixels: int
    agreement: float  # percent of pixels with the same label
    vs_reference: Scores  # candidate scored against the reference's labels
    reference_scores: Scores | None = None  # against ground truth, where labels exist
    candidate_scores: Scores | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def miou_delta(self) -> float | None:
        """Candidate minus reference mIoU against ground truth, in points."""
        if self.reference_scores is None or self.candidate_scores is None:
            return None
        return 100.0 * (self.candidate_scores.miou - self.reference_scores.miou)

    def to_dict(self) -> dict:
        out = {
            "reference": self.reference, "candidate": self.candidate, "units": "percent",
            "images": self.images, "pixels": self.pixels, "agreement": round(self.agreement, 4),
            "candidate_vs_reference": scores_dict(self.vs_reference, self.classes),
            "passed": not self.failures, "failures": self.failures,
        }
        if self.reference_scores is not None:
            out["reference_vs_truth"] = scores_dict(self.reference_scores, self.classes)
            out["candidate_vs_truth"] = scores_dict(self.candidate_scores, self.classes)
            out["miou_delta"] = round(self.miou_delta, 4)
        return out


def verify(reference: Backend, candidate: Backend, data: Images, limit: int | None = None, progress: bool = True,
           names: tuple[str, str] = ("reference", "candidate")) -> VerifyResult:
    """Run both artifacts on the same frames and compare their label maps (and each with the truth)."""
    check_comparable(reference.meta, candidate.meta, *names)
    classes, n = reference.meta.classes, reference.meta.num_classes
    ref_seg, cand_seg = Segmenter(reference), Segmenter(candidate)
    vs_ref = ConfusionMatrix(n)  # every pixel counts: the reference has no void
    labelled = isinstance(data, SegmentationDataset)
    ref_gt = ConfusionMatrix(n, data.ignore_index) if labelled else None
    cand_gt = ConfusionMatrix(n, data.ignore_index) if labelled else None
    same = total = count = 0
    for image, label in frames(data, limit, "verify", progress):
        a = known_ids(ref_seg(image).labels, reference.meta, names[0])
        b = known_ids(cand_seg(image).labels, candidate.meta, names[1])
        same += int(np.count_nonzero(a == b))
        total += a.size
        vs_ref.update(a, b)
        if labelled:
            ref_gt.update(label, a)
            cand_gt.update(label, b)
        count += 1
    return VerifyResult(names[0], names[1], tuple(classes), count, total, 100.0 * same / max(total, 1),
                        vs_ref.scores(), ref_gt.scores() if labelled else None,
                        cand_gt.scores() if labelled else None)


def check_thresholds(result: VerifyResult, max_miou_drop: float | None, min_agreement: float | None) -> list[str]:
    """Human-readable failures (empty when the candidate passes); also stored on the result."""
    failures = []
    if min_agreement is not None and result.agreement < min_agreement:
        failures.append(f"argmax agreement {result.agreement:.3f}% < --min-agreement {min_agreement}%")
    if max_miou_drop is not None:
        if result.miou_delta is None:
            raise VerifyError("--max-miou-drop needs ground truth: point --data at a labelled dataset (images/ + labels/)")
        if -result.miou_delta > max_miou_drop:
            failures.append(f"mIoU drops {-result.miou_delta:.3f} points > --max-miou-drop {max_miou_drop}")
    result.failures = failures
    return failures


def fmt(x: float | None, width: int = 7) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:{width}.2f}"


def eval_table(result: EvalResult) -> str:
    d = result.to_dict()
    width = max(len(c) for c in result.meta.classes) + 2
    lines = [f"{result.model} ({result.meta.model}, {result.meta.precision}) on {result.images} images", "",
             f"{'class':<{width}} {'IoU %':>7}"]
    lines += [f"{name:<{width}} {fmt(v)}" for name, v in d["iou"].items()]
    lines += ["", f"{'mIoU':<{width}} {fmt(d['miou'])}", f"{'pixel acc':<{width}} {fmt(d['pixel_accuracy'])}",
              f"{'class acc':<{width}} {fmt(d['class_accuracy'])}"]
    return "\n".join(lines)


def verify_table(result: VerifyResult) -> str:
    d = result.to_dict()
    width = max(len(c) for c in result.classes) + 2
    truth = result.reference_scores is not None
    head = f"{'class':<{width}} {'IoU vs ref %':>12}"
    if truth:
        head += f" {'ref vs GT %':>11} {'cand vs GT %':>12} {'delta':>7}"
    lines = [f"reference {result.reference}", f"candidate {result.candidate}",
             f"{result.images} images, {result.pixels} pixels", "", head]
    for name in result.classes:
        row = f"{name:<{width}} {fmt(d['candidate_vs_reference']['iou'][name], 12)}"
        if truth:
            r, c = d["reference_vs_truth"]["iou"][name], d["candidate_vs_truth"]["iou"][name]
            row += f" {fmt(r, 11)} {fmt(c, 12)} {fmt(None if r is None or c is None else c - r)}"
        lines.append(row)
    lines.append("")
    lines.append(f"{'mIoU':<{width}} {fmt(d['candidate_vs_reference']['miou'], 12)}" + (
        f" {fmt(d['reference_vs_truth']['miou'], 11)} {fmt(d['candidate_vs_truth']['miou'], 12)} "
        f"{fmt(d['miou_delta'])}" if truth else ""))
    lines.append(f"argmax agreement {result.agreement:.3f}%")
    lines.append("PASS" if not result.failures else "FAIL: " + "; ".join(result.failures))
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict) -> None:
    """Complete or absent."""
    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())


def open_pair(reference: str | Path, candidate: str | Path, backend: str = "auto") -> tuple[Backend, Backend]:
    """Load both sides of a verify. Weights run on PyTorch at the input size and with the label
    head of the exported side they are paired with, so neither a size nor a head difference is
    mistaken for a precision loss."""
    is_weights = [artifact_suffix(p) == WEIGHTS_SUFFIX for p in (reference, candidate)]
    if all(is_weights):
        return open_backend(reference), open_backend(candidate)
    exported = open_backend(candidate if is_weights[0] else reference, backend)
    try:
        if not any(is_weights):
            return exported, open_backend(candidate, backend)
        meta = exported.meta
        head = meta.extra.get("head", "full") if meta.output_kind == "labels" else "full"
        weights = open_backend(reference if is_weights[0] else candidate, input_size=meta.input_size, head=head)
    except BaseException:
        exported.close()
        raise
    return (weights, exported) if is_weights[0] else (exported, weights)
