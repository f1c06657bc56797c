"""Training-time augmentation of (BGR image, label map) pairs.

Geometry (scale, crop, flip) moves labels with pixels; photometry (brightness, contrast,
saturation, hue, blur, noise) changes pixels only. Every random draw comes from the
``numpy.random.Generator`` passed in, so a sample's augmentation is a function of the seed
it was built from, whichever worker process computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Photometric:
    """Strengths of the photometric changes (each drawn uniformly in +-strength).

    ``brightness`` and ``contrast`` are fractions of the pixel range and of the contrast,
    ``saturation`` a fraction of the saturation, ``hue`` degrees around the colour wheel;
    ``blur_p`` and ``noise_p`` the chance of a Gaussian blur (sigma up to ``blur_sigma``) and
    of Gaussian pixel noise (std up to ``noise_std`` grey levels).
    """

    brightness: float = 0.25
    contrast: float = 0.3
    saturation: float = 0.4
    hue: float = 12.0
    jitter_p: float = 0.8
    blur_p: float = 0.2
    blur_sigma: float = 1.5
    noise_p: float = 0.3
    noise_std: float = 8.0


def geometric(image: np.ndarray, label: np.ndarray, crop: tuple[int, int], scale: tuple[float, float],
              ignore: int, rng: np.random.Generator, flip: bool = True,
              centre: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random rescale, crop (padding with the void label where the image is smaller) and flip.

    ``centre`` (y, x in the unscaled image) places the crop around that pixel, with a
    random offset of up to a quarter crop, so a chosen object lands inside it.
    """
    s = float(rng.uniform(*scale))
    h, w = label.shape
    nh, nw = max(8, int(h * s + 0.5)), max(8, int(w * s + 0.5))
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST)
    ch, cw = crop
    ph, pw = max(0, ch - nh), max(0, cw - nw)
    if ph or pw:
        image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=0)
        label = cv2.copyMakeBorder(label, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=ignore)
    max_y, max_x = image.shape[0] - ch, image.shape[1] - cw
    if centre is None:
        y, x = int(rng.integers(0, max_y + 1)), int(rng.integers(0, max_x + 1))
    else:
        cy = centre[0] * nh / h + rng.uniform(-ch / 4, ch / 4)
        cx = centre[1] * nw / w + rng.uniform(-cw / 4, cw / 4)
        y = int(np.clip(round(cy - ch / 2), 0, max_y))
        x = int(np.clip(round(cx - cw / 2), 0, max_x))
    image, label = image[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
    if flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def photometric(image: np.ndarray, p: Photometric, rng: np.random.Generator) -> np.ndarray:
    """Colour jitter (in random order), then maybe blur, then maybe noise; BGR uint8 in and out."""
    out = image.astype(np.float32)
    if rng.random() < p.jitter_p:
        for op in rng.permutation(4):
            if op == 0:
                out += float(rng.uniform(-p.brightness, p.brightness)) * 255.0
            elif op == 1:
                f = float(rng.uniform(1 - p.contrast, 1 + p.contrast))
                out = (out - out.mean()) * f + out.mean()
            elif op == 2:
                f = float(rng.uniform(1 - p.saturation, 1 + p.saturation))
                grey = out @ np.array([0.114, 0.587, 0.299], np.float32)  # BGR luma weights
                out = grey[..., None] + (out - grey[..., None]) * f
            else:
                out = _shift_hue(out, float(rng.uniform(-p.hue, p.hue)))
            np.clip(out, 0, 255, out=out)
    if rng.random() < p.blur_p:
        out = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(0.3, p.blur_sigma)))
    if rng.random() < p.noise_p:
        out += rng.normal(0.0, float(rng.uniform(1.0, p.noise_std)), out.shape).astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _shift_hue(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate hue by ``degrees`` (OpenCV's float HSV has hue in 0..360)."""
    hsv = cv2.cvtColor(image / 255.0, cv2.COLOR_BGR2HSV)
    hsv[..., 0] = np.mod(hsv[..., 0] + degrees, 360.0)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR) * 255.0
