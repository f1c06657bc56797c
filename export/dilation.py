"""Yu & Koltun's Dilation8: VGG-16 front-end at output stride 8 + context module + x8 upsampling.

The front-end is the original unpadded form: VGG-16 with pool4 and pool5 removed, conv5_x
dilated by 2, fc6 as a 7x7 convolution dilated by 4 (4096 outputs), fc7 as 1x1 (4096), and a
1x1 to C classes. It expects an input reflection-padded by ``FRONTEND_MARGIN`` pixels on
each side; an SxS crop (S divisible by 8) then gives an (S/8)x(S/8) score map, and a 900x900
padded input gives the 66x66 map of the original Caffe model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .context import ContextModule, context_basic, context_large

FRONTEND_MARGIN = 186  # the unpadded VGG-16 front-end consumes 372 pixels per axis
# (name, out_channels, dilation) per VGG-16 block; "M" is a 2x2 max pool.
_VGG_CFG: list[tuple[str, int, int] | str] = [
    ("conv1_1", 64, 1), ("conv1_2", 64, 1), "M",
    ("conv2_1", 128, 1), ("conv2_2", 128, 1), "M",
    ("conv3_1", 256, 1), ("conv3_2", 256, 1), ("conv3_3", 256, 1), "M",
    ("conv4_1", 512, 1), ("conv4_2", 512, 1), ("conv4_3", 512, 1),
    ("conv5_1", 512, 2), ("conv5_2", 512, 2), ("conv5_3", 512, 2),
]


class Dilation8FrontEnd(nn.Module):
    """Unpadded VGG-16 front-end at output stride 8 (input must already carry the margin)."""

    def __init__(self, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for item in _VGG_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                continue
            _, c_out, dilation = item
            layers += [nn.Conv2d(c_in, c_out, 3, dilation=dilation), nn.ReLU(inplace=True)]
            c_in = c_out
        layers += [
            nn.Conv2d(512, 4096, 7, dilation=4), nn.ReLU(inplace=True), nn.Dropout2d(dropout),  # fc6
            nn.Conv2d(4096, 4096, 1), nn.ReLU(inplace=True), nn.Dropout2d(dropout),  # fc7
            nn.Conv2d(4096, num_classes, 1),  # final
        ]
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def reflect_pad(x: torch.Tensor, margin: int) -> torch.Tensor:
    """Reflection padding by ``margin`` even when the input is smaller than the margin.

    A single reflect pad must be narrower than the input, so small inputs are padded in
    steps (each step reflects the already padded map, as mirroring a mirror would).
    """
    left = margin
    while left > 0:
        step = min(left, x.shape[-1] - 1, x.shape[-2] - 1)
        x = F.pad(x, [step] * 4, mode="reflect")
        left -= step
    return x


class Dilation8(nn.Module):
    """Front-end + context module + bilinear x8 upsampling back to the input size."""

    output_stride = 8

    def __init__(self, num_classes: int, context: ContextModule) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.frontend = Dilation8FrontEnd(num_classes)
        self.context = context

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores at output stride 8 (before the upsampling; export heads start here)."""
        return self.context(self.frontend(reflect_pad(x, FRONTEND_MARGIN)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.scores(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def dilation8_frontend(num_classes: int = 11) -> Dilation8FrontEnd:
    """The front-end alone, unpadded (feed it an input carrying the 186-pixel margin)."""
    return Dilation8FrontEnd(num_classes)


def dilation8_basic(num_classes: int = 11) -> Dilation8:
    """Dilation8 with the basic context module."""
    return Dilation8(num_classes, context_basic(num_classes))


def dilation8_large(num_classes: int = 11) -> Dilation8:
    """Dilation8 with the large context module."""
    return Dilation8(num_classes, context_large(num_classes))
