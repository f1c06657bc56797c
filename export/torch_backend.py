"""PyTorch backend for .safetensors weights, so `dilseg run`, `eval` and `verify` measure the
trained model itself with the runtime's own pre- and postprocessing.

It needs the model zoo, so it lives on the export side; the runtime finds it through the
``dilseg.backends`` entry point (``pytorch``) and imports it only for weights: torch stays here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dilseg.runtime.artifact import WEIGHTS_SUFFIX
from dilseg.runtime.backends import Backend, BackendError, BackendOptions
from dilseg.runtime.classes import PRESETS
from dilseg.runtime.files import sha256_file
from dilseg.runtime.metadata import ModelMeta

from .heads import LabelHead
from .weights import load_model, read_weights_info, weights_classes


def weights_meta(path: str | Path, input_size: tuple[int, int] | None = None) -> ModelMeta:
    """Metadata for a weights file: the classes its header records (names, palette, void label;
    CamVid's where it names none), as `dilseg export onnx --weights` writes them into the graph."""
    info = read_weights_info(path)
    name = info.get("model")
    if not name:
        raise BackendError(f"{path}: the weights header does not name its model; re-save it with dilseg train")
    classes = weights_classes(info) or PRESETS["camvid"]
    return classes.model_meta(name, input_size, output_kind="labels", weights_sha256=sha256_file(path))


@dataclass(frozen=True)
class TorchOptions(BackendOptions):
    # None lets the model see each frame at its own size (rounded down to a multiple of 8); pass
    # an ONNX model's fixed size to compare the two at equal resolution.
    input_size: tuple[int, int] | None = None
    device: str = "auto"  # "auto" (CUDA when torch sees one), "cpu", "cuda", "cuda:1", ...
    # The label head (export/heads.py): run an exported graph's own head to compare like with like.
    head: str = "full"
    # NHWC activations: oneDNN's convolutions run without reordering each layer's input
    # (about 2x faster on CPUs than NCHW for these models; the labels are the same).
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.input_size is not None:
            object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))


class TorchBackend(Backend):
    """Runs a zoo model from safetensors weights; returns int32 labels like an exported graph."""

    name = "pytorch"
    label = "PyTorch"
    suffixes = (WEIGHTS_SUFFIX,)
    artifacts = ".safetensors weights from `dilseg train`"
    selection_hint = "pass .safetensors weights (they run on PyTorch)"
    Options = TorchOptions
    model: torch.nn.Module | None = None

    def load_impl(self) -> None:
        self.require_file("weights")
        meta = weights_meta(self.path, self.options.input_size)
        self.meta = replace(meta, extra={**meta.extra, "head": self.options.head})
        device = self.options.device
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        model, _ = load_model(self.path)
        self.model = LabelHead(model.eval(), self.options.head).eval().to(self.device)
        if self.options.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def infer_impl(self, tensor: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(tensor, dtype=np.float32)).to(self.device)
            if self.options.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.model(x).cpu().numpy()

    def close_impl(self) -> None:
        self.model = None
