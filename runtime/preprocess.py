"""The one preprocessing definition shared by every backend, the trainer and the evaluator.

Frames arrive as BGR uint8 (OpenCV's order); the model's metadata says what it wants.
"""

from __future__ import annotations

import cv2
import numpy as np

from .metadata import ModelMeta


def input_size_for(frame_shape: tuple[int, ...], meta: ModelMeta) -> tuple[int, int]:
    """(H, W) the model will see: its fixed size, or for a dynamic model the frame size
    rounded down to a multiple of 8 (the output stride)."""
    if meta.input_size is not None:
        return meta.input_size
    h, w = frame_shape[:2]
    return max(8, h - h % 8), max(8, w - w % 8)


def normalize(frame_bgr: np.ndarray, meta: ModelMeta, out: np.ndarray | None = None) -> np.ndarray:
    """BGR uint8 HxWx3 -> float32 1x3xHxW in the model's colour order, (x/255 - mean) / std."""
    if frame_bgr.dtype != np.uint8 or frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3:
        raise ValueError(f"expected a BGR uint8 HxWx3 frame, got {frame_bgr.dtype} {frame_bgr.shape}")
    order = [2, 1, 0] if meta.color_order == "RGB" else [0, 1, 2]
    # Fold /255, mean and std into one scale and shift per channel: one pass over the pixels.
    scale = 1.0 / (255.0 * np.asarray(meta.std, dtype=np.float32))
    shift = -np.asarray(meta.mean, dtype=np.float32) / np.asarray(meta.std, dtype=np.float32)
    h, w = frame_bgr.shape[:2]
    if out is None:
        out = np.empty((1, 3, h, w), dtype=np.float32)
    for c, src in enumerate(order):
        np.multiply(frame_bgr[:, :, src], scale[c], out=out[0, c], casting="unsafe")
        out[0, c] += shift[c]
    return out


def preprocess(frame_bgr: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """Resize (bilinear) to the model input and normalise: the model's input tensor."""
    h, w = input_size_for(frame_bgr.shape, meta)
    if frame_bgr.shape[:2] != (h, w):
        frame_bgr = cv2.resize(frame_bgr, (w, h), interpolation=cv2.INTER_LINEAR)
    return normalize(frame_bgr, meta)
