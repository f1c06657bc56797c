"""Shared by test_eval, test_verify, test_quantize and test_dataset: CamVid's location, a tiny
edge_s model briefly trained on real CamVid frames (an untrained net predicts one class
everywhere, which would make mIoU, agreement and int8 tests meaningless), its fp32 / fp16 /
int8 exports, and the hand-made RGB-argmax model with exactly predictable output.

Artifacts are cached under the session's base temp folder, so every test file reuses them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[1]
# ../shared/data/camvid from the repo root; DILSEG_CAMVID names another copy (a GPU machine's).
CAMVID = Path(os.environ.get("DILSEG_CAMVID") or REPO.parent / "shared" / "data" / "camvid")
needs_camvid = pytest.mark.skipif(not (CAMVID / "val" / "labels").is_dir(),
                                  reason=f"CamVid not found at {CAMVID} (../shared/data/camvid, or set DILSEG_CAMVID)")
SIZE = (64, 96)  # small input: every test model runs in milliseconds


def cached(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    path = factory.getbasetemp() / "precision-artifacts" / name
    if not path.exists():
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        threads = torch.get_num_threads()
        # One thread: repeatable numerics, and models this small gain nothing from more.
        torch.set_num_threads(1)
        try:
            make(path)
        finally:
            torch.set_num_threads(threads)
    return path


def train_tiny(path: Path, steps: int = 150, images: int = 48) -> None:
    """edge_s fitted for a few seconds on CamVid train frames at 64x96: confident, varied labels."""
    import torch
    import torch.nn.functional as F

    from dilseg.runtime.classes import PRESETS
    from dilseg.export.weights import save_weights
    from dilseg.export.zoo import create_model
    from dilseg.runtime.dataset import CAMVID_CLASSES, CAMVID_IGNORE, SegmentationDataset
    from dilseg.runtime.preprocess import normalize

    data = SegmentationDataset(CAMVID, "train")
    meta = PRESETS["camvid"].model_meta("edge_s")
    xs, ys = [], []
    for i in np.linspace(0, len(data) - 1, images).round().astype(int):
        image, label = data[i]
        xs.append(normalize(cv2.resize(image, SIZE[::-1], interpolation=cv2.INTER_AREA), meta)[0])
        ys.append(cv2.resize(label, SIZE[::-1], interpolation=cv2.INTER_NEAREST))
    x_all = torch.from_numpy(np.stack(xs))
    y_all = torch.from_numpy(np.stack(ys).astype(np.int64))
    torch.manual_seed(0)
    model = create_model("edge_s").train()
    opt = torch.optim.AdamW(model.parameters(), 5e-3)
    for step in range(steps):
        batch = torch.randint(0, len(x_all), (8,))
        x, y = x_all[batch], y_all[batch]
        if step % 2:
            x, y = x.flip(-1), y.flip(-1)
        loss = F.cross_entropy(model(x), y, ignore_index=CAMVID_IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = 5e-3 * (1 - step / steps) ** 0.9
    save_weights(model.eval(), path, "edge_s", CAMVID_CLASSES)


def tiny_weights(factory: pytest.TempPathFactory) -> Path:
    return cached(factory, "tiny_edge_s.safetensors", train_tiny)


def tiny_onnx(factory: pytest.TempPathFactory, precision: str = "fp32", target: str = "tensorrt",
              method: str = "entropy") -> Path:
    """The tiny model exported at 64x96 in a given precision (int8: flavour and calibration)."""
    weights = tiny_weights(factory)

    def make(path: Path) -> None:
        from dilseg.export.onnx_export import export_onnx
        from dilseg.export.quantize import export_variant
        from dilseg.export.torch_backend import weights_meta
        from dilseg.export.weights import load_model

        model, _ = load_model(weights)
        meta = weights_meta(weights, SIZE)
        if precision == "fp32":
            export_onnx(model, meta, path, SIZE)
        else:
            export_variant(model, meta, path, SIZE, precision, CAMVID / "train", 16, target, method)

    name = "tiny_fp32.onnx" if precision == "fp32" else (
        "tiny_fp16.onnx" if precision == "fp16" else f"tiny_int8_{target}_{method}.onnx")
    return cached(factory, name, make)


def with_meta(src: Path, dst: Path, **changes) -> Path:
    """A copy of an ONNX whose dilseg metadata is edited (a deliberately broken artifact)."""
    proto = onnx.load(str(src))
    entry = next(p for p in proto.metadata_props if p.key == "dilseg")
    meta = json.loads(entry.value)
    meta.update(changes)
    entry.value = json.dumps(meta)
    onnx.save(proto, str(dst))
    return dst


RGB_CLASSES = ("red", "green", "blue")


def rgb_argmax_onnx(path: Path, ignore_index: int = 3) -> Path:
    """A 'model' whose logits are its input, with mean 0 / std 1 and a dynamic size: each pixel
    is labelled with its strongest RGB channel, so its IoU on a crafted image is known exactly."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, "h", "w"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, "h", "w"])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "rgb_argmax", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    meta = {"model": "rgb_argmax", "classes": list(RGB_CLASSES), "palette": [[255, 0, 0], [0, 255, 0], [0, 0, 255]],
            "input_size": None, "output_kind": "logits", "mean": [0, 0, 0], "std": [1, 1, 1],
            "ignore_index": ignore_index}
    entry = proto.metadata_props.add()
    entry.key, entry.value = "dilseg", json.dumps(meta)
    onnx.save(proto, str(path))
    return path


def write_pair(root: Path, stem: str, image_bgr: np.ndarray, label: np.ndarray | None) -> None:
    """Lossless PNG image (+ label) into root/images and root/labels."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(root / "images" / f"{stem}.png"), image_bgr)
    if label is not None:
        (root / "labels").mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / "labels" / f"{stem}.png"), label)
