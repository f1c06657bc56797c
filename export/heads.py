"""The label head added at export: class scores at output stride 8 -> int32 labels at input size.

The models end in Yu & Koltun's bilinear x8 upsampling of the C class scores; the ArgMax
then runs at full resolution. That head is a large share of an int8 or bf16 graph's time
(C full-size float maps, a full-size ArgMax and a layout reorder in front of them), while
the labels it produces change only along class boundaries when the ArgMax runs on a
smaller bilinear upsampling and its labels are repeated (nearest) to full size:

- ``full``: bilinear x8 to the input size, ArgMax there (the paper's head; any model).
- ``half``: bilinear x4 to 1/2 size, ArgMax, each label repeated 2x2.
- ``quarter``: bilinear x2 to 1/4 size, ArgMax, each label repeated 4x4.
- ``eighth``: ArgMax on the stride-8 scores, each label repeated 8x8.

Upsampling by k with half-pixel centres samples the x8 bilinear field at the centre of
each (8/k)x(8/k) block of output pixels, so a reduced head assigns every block the
label the paper's head gives at the block's centre. Logits exports always use ``full``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dilseg.runtime.errors import DilsegError

HEADS: dict[str, str] = {
    "full": "bilinear x8 of the class scores, ArgMax at full resolution (the paper's head)",
    "half": "bilinear x4 of the class scores, ArgMax at 1/2 resolution, labels repeated 2x2",
    "quarter": "bilinear x2 of the class scores, ArgMax at 1/4 resolution, labels repeated 4x4",
    "eighth": "ArgMax on the stride-8 class scores, labels repeated 8x8",
}
# Block size (output pixels per label, per axis) of each head.
REPEAT = {"full": 1, "half": 2, "quarter": 4, "eighth": 8}
DEFAULT_HEAD = "half"


class HeadError(DilsegError, ValueError):
    """The requested head does not fit this model."""


def has_scores(model: nn.Module) -> bool:
    """Whether the model exposes its class scores at stride 8 before the final upsampling.

    The reduced heads are defined on a stride-8 map; a model at another stride (the front-end
    study's edge_m_os32, stride 32) exports with ``full``: its own bilinear upsampling.
    """
    return callable(getattr(model, "scores", None)) and getattr(model, "output_stride", None) == 8


def _why_no_scores(model: nn.Module) -> str:
    stride = getattr(model, "output_stride", None)
    if callable(getattr(model, "scores", None)) and stride is not None:
        return f"{type(model).__name__}'s scores are at output stride {stride}"
    return f"{type(model).__name__} does not"


def resolve_head(model: nn.Module, head: str | None, output_kind: str = "labels") -> str:
    """The head to export: ``head``, or the default where the model allows it.

    ``None`` picks DEFAULT_HEAD for models exposing stride-8 scores and ``full`` for any
    other model (a user's network whose graph ends in its own upsampling).
    """
    if head is not None and head not in HEADS:
        raise HeadError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
    if output_kind == "logits":
        if head not in (None, "full"):
            raise HeadError(f"--head {head} applies to labels exports; logits are always upsampled x8 (head full)")
        return "full"
    if head is None:
        return DEFAULT_HEAD if has_scores(model) else "full"
    if head != "full" and not has_scores(model):
        raise HeadError(f"head {head!r} needs a model exposing its stride-8 class scores (a scores() method); "
                        f"{_why_no_scores(model)}: use --head full")
    return head


class LabelHead(nn.Module):
    """A model plus its head: ``forward`` gives int32 labels (N, H, W), ``logits`` the scores
    the ArgMax reads (at full, 1/2, 1/4 or 1/8 resolution). ``crop`` trims the labels to the
    input size (for dynamic-shape graphs)."""

    def __init__(self, model: nn.Module, head: str = "full", crop: bool = False) -> None:
        super().__init__()
        if head not in HEADS:
            raise HeadError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
        if head != "full" and not has_scores(model):
            raise HeadError(f"head {head!r} needs a model with a scores() method at output stride 8; "
                            f"{_why_no_scores(model)}")
        self.model, self.head, self.crop = model, head, crop
        self.repeat = REPEAT[head]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.head == "full":
            return self.model(x)
        scores = self.model.scores(x)
        if self.head == "eighth":
            return scores
        k = 8 // self.repeat
        return F.interpolate(scores, size=(scores.shape[-2] * k, scores.shape[-1] * k), mode="bilinear",
                             align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels = self.logits(x).argmax(1)
        if self.repeat > 1:
            # A nearest Resize of the labels as one float channel (class ids are exact in
            # float): 10x cheaper in ONNX Runtime than an int32 Expand + Reshape, and a Resize
            # of integers is not supported by every runtime.
            labels = F.interpolate(labels[:, None].float(), scale_factor=float(self.repeat), mode="nearest").squeeze(1)
        # TensorRT's ArgMax yields INT64 unless the graph casts: only H*W int32 come back.
        labels = labels.to(torch.int32)
        if self.crop:
            # A dynamic graph may see a size that is not a multiple of 8, whose stride-8 map
            # covers more than the input (the runtime itself always feeds multiples of 8).
            labels = labels[:, : x.shape[-2], : x.shape[-1]]
        return labels
