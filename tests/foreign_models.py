"""Segmentation networks this project did not write, and the bad inputs `dilseg import` refuses.

The factories build Hugging Face `transformers` models from small configs (model hubs are out
of reach, so weights are random); `dilseg export onnx --torch tests/foreign_models.py:segformer`
calls them as a user's factory. ``lively`` gives BatchNorm layers running statistics from
image-like input so the random models predict many classes rather than one. ``user_export``
is the user's own route to ONNX: plain ``torch.onnx.export``, nothing from dilseg.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


def segformer(num_labels: int = 11) -> nn.Module:
    """SegFormer (MiT encoder + all-MLP decoder): logits at 1/4 of the input."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    cfg = SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 2, 4],
                          decoder_hidden_size=64, num_labels=num_labels)
    return SegformerForSemanticSegmentation(cfg).eval()


def upernet(num_labels: int = 11) -> nn.Module:
    """UPerNet on a ConvNeXt backbone: logits already upsampled to the input size."""
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = UperNetConfig(backbone_config=backbone, hidden_size=32, use_auxiliary_head=False, num_labels=num_labels)
    return UperNetForSemanticSegmentation(cfg).eval()


class Logits(nn.Module):
    """What users write to export a Hugging Face model: the ``.logits`` of its output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


class Labels(nn.Module):
    """A graph that ends in its own argmax (int64 labels N x H/4 x W/4), as some exports do."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits.argmax(1)


class Classifier(nn.Module):
    """An image classifier: N x 1000 scores."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


class Detector(nn.Module):
    """A detector's heads: boxes N x 100 x 4, scores N x 100, classes N x 100 (none spatial)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.boxes, self.scores = nn.Linear(8, 400), nn.Linear(8, 100)

    def forward(self, x: torch.Tensor):
        f = self.conv(x).mean((2, 3))
        scores = self.scores(f)
        return self.boxes(f).reshape(-1, 100, 4), scores.sigmoid(), (scores * 10).round().to(torch.int64)


class Gray(nn.Module):
    """A segmenter of one-channel (grayscale) images."""

    def __init__(self, num_labels: int = 11) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, num_labels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class OddStride(nn.Module):
    """Scores at 1/3 of the input (a stride that does not divide a 64x96 input)."""

    def __init__(self, num_labels: int = 11) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_labels, 3, stride=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Several(nn.Module):
    """SegFormer behind the output conventions of other libraries: torchvision's dict
    ``{"out": ..., "aux": ...}`` or a plain tuple (aux first, so the default pick would be wrong)."""

    def __init__(self, num_labels: int, kind: str) -> None:
        super().__init__()
        self.model, self.kind = segformer(num_labels), kind

    def forward(self, x: torch.Tensor):
        logits = self.model(pixel_values=x).logits
        aux = logits.flip(1)
        return {"aux": aux, "out": logits} if self.kind == "dict" else (aux, logits)


def segformer_dict(num_labels: int = 11, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Several(num_labels, "dict").eval()


def segformer_tuple(num_labels: int = 11, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Several(num_labels, "tuple").eval()


def odd_stride(num_labels: int = 11) -> nn.Module:
    return OddStride(num_labels).eval()


def classifier() -> nn.Module:
    return Classifier().eval()


def lively(model: nn.Module, size: tuple[int, int]) -> nn.Module:
    """BatchNorm running statistics from the synthetic test pattern (train-mode passes, no
    gradient), so a randomly initialised network's masks hold many classes."""
    from dilseg.runtime.classes import PRESETS
    from dilseg.runtime.metadata import ModelMeta
    from dilseg.runtime.preprocess import preprocess
    from dilseg.runtime.sources import test_frame

    camvid = PRESETS["camvid"]
    meta = ModelMeta(model="probe", classes=camvid.names, palette=camvid.palette, input_size=size)
    x = torch.from_numpy(np.concatenate([preprocess(test_frame(i, 160, 120), meta) for i in range(0, 200, 25)]))
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x)
    return model.eval()


def user_export(module: nn.Module, path: Path, size: tuple[int, int], dynamic: bool = False,
                dynamo: bool = True, output_names: list[str] | None = None, opset: int = 17) -> Path:
    """``torch.onnx.export`` as a user calls it (the default exporter, or the TorchScript one)."""
    import warnings

    x = torch.zeros(1, 3, *size) if not isinstance(module, Gray) else torch.zeros(1, 1, *size)
    kw: dict = {"input_names": ["pixel_values"], "output_names": output_names or ["logits"]}
    if dynamic:
        kw["dynamic_axes"] = {"pixel_values": {0: "batch", 2: "height", 3: "width"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), dynamo=dynamo and not dynamic, opset_version=opset if not dynamo
                          else None, **kw)
    return Path(path)
