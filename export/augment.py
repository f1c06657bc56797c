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
    """Random rescale, crop (void label and black pixels where the scaled image is smaller
    than the crop, at its bottom and right) and flip.

    ``centre`` (y, x in the unscaled image) places the crop around that pixel, with a
    random offset of up to a quarter crop, so a chosen object lands inside it. The three
    steps are one affine map sampled straight into the crop (one pass at crop size, not a
    resize of the whole frame at up to twice its size), with resize's pixel-centre convention.
    """
    s = float(rng.uniform(*scale))
    h, w = label.shape
    nh, nw = max(8, int(h * s + 0.5)), max(8, int(w * s + 0.5))
    sy, sx = nh / h, nw / w
    ch, cw = crop
    max_y, max_x = max(0, nh - ch), max(0, nw - cw)
    if centre is None:
        y, x = int(rng.integers(0, max_y + 1)), int(rng.integers(0, max_x + 1))
    else:
        cy = centre[0] * sy + rng.uniform(-ch / 4, ch / 4)
        cx = centre[1] * sx + rng.uniform(-cw / 4, cw / 4)
        y = int(np.clip(round(cy - ch / 2), 0, max_y))
        x = int(np.clip(round(cx - cw / 2), 0, max_x))
    mirrored = flip and rng.random() < 0.5
    # Crop pixel (u, v) -> source (u' + x + 0.5) / sx - 0.5, u' = u or cw - 1 - u when mirrored.
    if mirrored:
        row_x = (-1 / sx, 0.0, (cw - 1 + x + 0.5) / sx - 0.5)
    else:
        row_x = (1 / sx, 0.0, (x + 0.5) / sx - 0.5)
    m = np.array([row_x, (0.0, 1 / sy, (y + 0.5) / sy - 0.5)])
    flags = cv2.WARP_INVERSE_MAP
    valid = np.zeros((ch, cw), bool)
    valid[:min(ch, nh - y), :min(cw, nw - x)] = True  # inside the scaled frame
    if mirrored:
        valid = valid[:, ::-1]
    out_image = cv2.warpAffine(image, m, (cw, ch), flags=cv2.INTER_LINEAR | flags, borderMode=cv2.BORDER_REPLICATE)
    out_label = cv2.warpAffine(label, m, (cw, ch), flags=cv2.INTER_NEAREST | flags, borderMode=cv2.BORDER_REPLICATE)
    out_image[~valid] = 0
    out_label[~valid] = ignore
    return out_image, out_label


# Luma weights and the RGB -> YIQ transform, in BGR channel order: hue turns I/Q about Y.
_LUMA = np.array([0.114, 0.587, 0.299], np.float64)
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])[:, ::-1]
_YIQ_INV = np.linalg.inv(_YIQ)


def photometric(image: np.ndarray, p: Photometric, rng: np.random.Generator) -> np.ndarray:
    """Colour jitter (brightness, contrast, saturation, hue in random order), then maybe blur,
    then maybe noise; BGR uint8 in and out.

    The four jitters are affine maps of the colour vector, so they compose into one 3x4
    matrix applied in a single pass (cv2.transform saturates to uint8): several times
    cheaper than four passes over float pixels, which matters where the augmenting workers
    bound a GPU's training speed. Unlike clipping after each step, only the result is clipped.
    """
    out = image
    if rng.random() < p.jitter_p:
        a, b = np.eye(3), np.zeros(3)
        mean = np.asarray(cv2.mean(image)[:3], np.float64)  # tracked through the maps for contrast
        for op in rng.permutation(4):
            if op == 0:
                m, t = np.eye(3), np.full(3, float(rng.uniform(-p.brightness, p.brightness)) * 255.0)
            elif op == 1:
                f = float(rng.uniform(1 - p.contrast, 1 + p.contrast))
                grey = float(_LUMA @ (a @ mean + b))
                m, t = f * np.eye(3), np.full(3, (1 - f) * grey)
            elif op == 2:
                f = float(rng.uniform(1 - p.saturation, 1 + p.saturation))
                m, t = f * np.eye(3) + (1 - f) * np.outer(np.ones(3), _LUMA), np.zeros(3)
            else:
                theta = np.deg2rad(float(rng.uniform(-p.hue, p.hue)))
                c, s = np.cos(theta), np.sin(theta)
                m, t = _YIQ_INV @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ _YIQ, np.zeros(3)
            a, b = m @ a, m @ b + t
        out = cv2.transform(image, np.hstack([a, b[:, None]]))
    if rng.random() < p.blur_p:
        out = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(0.3, p.blur_sigma)))
    if rng.random() < p.noise_p:
        h, w = out.shape[:2]
        bank = _noise_bank(h, w)
        y, x = int(rng.integers(0, bank.shape[0] - h + 1)), int(rng.integers(0, bank.shape[1] - w + 1))
        noise = bank[y:y + h, x:x + w] * float(rng.uniform(1.0, p.noise_std) * rng.choice((-1.0, 1.0)))
        out = cv2.add(out, noise, dtype=cv2.CV_8U)
    return out


_NOISE: dict[tuple[int, int], np.ndarray] = {}


def _noise_bank(h: int, w: int) -> np.ndarray:
    """Unit Gaussian noise larger than the crop, made once per process from a fixed seed: a
    random window of it (random offset and sign) costs a slice, where drawing every pixel
    anew costs more than all the other augmentation together."""
    key = (h + 256, w + 256)
    if key not in _NOISE:
        _NOISE[key] = np.random.default_rng(20240601).standard_normal((*key, 3), dtype=np.float32)
    return _NOISE[key]
