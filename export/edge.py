"""Fast edge model: a small dilated residual network (DRN-D style) at output stride 8.

Stem at 1/2 and 1/4 of plain conv layers, residual stages at 1/8 whose later blocks dilate by
2 and 4 instead of downsampling, then two degridding layers (a single dilation-2 and a single
dilation-1 conv layer without residual, DRN-D's last two levels; DRN-C uses residual-free
two-conv blocks there) to remove the gridding artefacts of the dilated stages, a 1x1 to C
classes, Yu & Koltun's basic context module, and a bilinear x8 upsampling that exports as
a single ONNX Resize (no transposed convolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .context import context_basic


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """ResNet basic block with optional stride and dilation."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class EdgeDRN(nn.Module):
    """Dilated residual segmentation network for edge devices.

    ``widths`` are the channels of the 1/2 stem, the 1/4 stem, the 1/8 stage, and the
    dilated stages; ``blocks`` the number of residual blocks in the 1/8, dilation-2 and
    dilation-4 stages.
    """

    output_stride = 8

    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, int, int, int],
        blocks: tuple[int, int, int] = (1, 1, 1),
    ) -> None:
        super().__init__()
        c0, c1, c2, c3 = widths
        self.num_classes = num_classes
        self.stem = nn.Sequential(_conv_bn_relu(3, c0, stride=2), _conv_bn_relu(c0, c1, stride=2))
        stage8 = [BasicBlock(c1, c2, stride=2)] + [BasicBlock(c2, c2) for _ in range(blocks[0] - 1)]
        dil2 = [BasicBlock(c2, c3, dilation=2)] + [BasicBlock(c3, c3, dilation=2) for _ in range(blocks[1] - 1)]
        dil4 = [BasicBlock(c3, c3, dilation=4) for _ in range(blocks[2])]
        self.stages = nn.Sequential(*stage8, *dil2, *dil4)
        # Degridding: no residual connections, so the dilated stages' checkerboard is filtered out.
        self.degrid = nn.Sequential(_conv_bn_relu(c3, c3, dilation=2), _conv_bn_relu(c3, c3, dilation=1))
        self.classifier = nn.Conv2d(c3, num_classes, 1)
        self.context = context_basic(num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m not in self.context.convs:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores at output stride 8 (before the upsampling; export heads start here)."""
        return self.context(self.classifier(self.degrid(self.stages(self.stem(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.scores(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def edge_s(num_classes: int = 11) -> EdgeDRN:
    """Smallest edge model."""
    return EdgeDRN(num_classes, (16, 32, 64, 96), (1, 1, 1))


def edge_m(num_classes: int = 11) -> EdgeDRN:
    """Medium edge model."""
    return EdgeDRN(num_classes, (24, 48, 96, 128), (1, 1, 1))


def edge_l(num_classes: int = 11) -> EdgeDRN:
    """Largest edge model."""
    return EdgeDRN(num_classes, (32, 64, 128, 192), (2, 1, 1))
