"""PyTorch backend for .safetensors weights, so `dilseg eval` and `dilseg verify` measure the
trained model itself with the runtime's own pre- and postprocessing.

The runtime reaches this module only for a path ending in .safetensors, and imports it lazily:
torch stays on the export side.
"""

from __future__ import annotations

import colorsys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dilseg.runtime.backends.base import BackendError
from dilseg.runtime.metadata import ModelMeta

from .train import camvid_meta
from dilseg.runtime.files import sha256_file

from .weights import load_model, read_weights_info


def spread_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """Distinct colours for classes that have no conventional palette."""
    return tuple(tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / n, 0.65, 0.95)) for i in range(n))


def weights_meta(path: str | Path, input_size: tuple[int, int] | None = None) -> ModelMeta:
    """Metadata for a weights file: CamVid's preprocessing and the classes its header names."""
    info = read_weights_info(path)
    name = info.get("model")
    if not name:
        raise BackendError(f"{path}: the weights header does not name its model; re-save it with dilseg train")
    meta = camvid_meta(name, input_size)
    classes = tuple(info.get("classes") or meta.classes)
    if classes != meta.classes:
        palette = meta.palette if len(classes) == meta.num_classes else spread_palette(len(classes))
        meta = replace(meta, classes=classes, palette=palette)
    return replace(meta, output_kind="labels", weights_sha256=sha256_file(path))


class TorchBackend:
    """Runs a zoo model from safetensors weights; returns int32 labels like an exported graph.

    ``input_size`` None lets the model see each frame at its own size (rounded down to a
    multiple of 8); pass an ONNX model's fixed size to compare the two at equal resolution.
    """

    name = "pytorch"

    def __init__(self, path: str | Path, input_size: tuple[int, int] | None = None, device: str = "auto") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BackendError(f"{self.path}: no such weights file")
        self.meta: ModelMeta = weights_meta(self.path, input_size)
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.model: torch.nn.Module | None = None

    def load(self) -> "TorchBackend":
        model, _ = load_model(self.path)
        self.model = model.eval().to(self.device)
        return self

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise BackendError("backend is not loaded; call load() first")
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(np.ascontiguousarray(tensor, dtype=np.float32)).to(self.device))
            return logits.argmax(1).to(torch.int32).cpu().numpy()

    def close(self) -> None:
        self.model = None

    def __enter__(self) -> "TorchBackend":
        return self if self.model is not None else self.load()

    def __exit__(self, *exc) -> None:
        self.close()
