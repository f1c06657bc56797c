"""Fast edge model: a small dilated residual network (DRN-D style) at output stride 8.

Stem at 1/2 and 1/4 of plain conv layers, residual stages at 1/8 whose later blocks dilate by
2 and 4 instead of downsampling, then two degridding layers (a single dilation-2 and a single
dilation-1 conv layer without residual, DRN-D's last two levels; DRN-C uses residual-free
two-conv blocks there) to remove the gridding artefacts of the dilated stages, a 1x1 to C
classes, Yu & Koltun's basic context module, and a bilinear x8 upsampling that exports as
a single ONNX Resize (no transposed convolution).

The same front-end also builds the variants of Yu & Koltun's central comparison (the
front-end study, training/README.md): ``output_stride=32`` puts a 2x2 max pool where the
stages dilate (the pooling the paper removed) and sets every dilation to 1, so the weights
are the same shapes as at stride 8 and only resolution differs; ``context`` picks no
context module, the basic or the large one, and ``context_init`` the paper's identity
initialisation or the random one this network gives its other convolutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .context import ContextModule, context_basic, context_large

CONTEXTS = {"none": None, "basic": context_basic, "large": context_large}
CONTEXT_INITS = ("identity", "random")
OUTPUT_STRIDES = (8, 32)


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
    dilation-4 stages. ``output_stride`` 32 pools before the dilation-2 and dilation-4
    stages instead of dilating them; ``context`` is "basic" (the shipped models), "large"
    or "none" (the classifier's scores are the output); ``context_init`` "identity" (the
    paper's) or "random".
    """

    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, int, int, int],
        blocks: tuple[int, int, int] = (1, 1, 1),
        output_stride: int = 8,
        context: str = "basic",
        context_init: str = "identity",
    ) -> None:
        super().__init__()
        if output_stride not in OUTPUT_STRIDES or context not in CONTEXTS or context_init not in CONTEXT_INITS:
            raise ValueError(f"output_stride in {OUTPUT_STRIDES}, context in {tuple(CONTEXTS)}, context_init in "
                             f"{CONTEXT_INITS}; got {output_stride}, {context!r}, {context_init!r}")
        c0, c1, c2, c3 = widths
        self.num_classes = num_classes
        self.output_stride = output_stride
        # At stride 32 each dilation becomes a pooling step (stride 8 -> 16 -> 32), where the
        # dilated network stays at 8 and spreads its filters by 2 and 4 instead.
        pooled = output_stride == 32
        d2, d4 = (1, 1) if pooled else (2, 4)
        # ceil_mode: the last row and column of an odd-sized map are pooled, not dropped.
        pool1, pool2 = ([nn.MaxPool2d(2, 2, ceil_mode=True)], [nn.MaxPool2d(2, 2, ceil_mode=True)]) if pooled else ([], [])
        self.stem = nn.Sequential(_conv_bn_relu(3, c0, stride=2), _conv_bn_relu(c0, c1, stride=2))
        stage8 = [BasicBlock(c1, c2, stride=2)] + [BasicBlock(c2, c2) for _ in range(blocks[0] - 1)]
        dil2 = [BasicBlock(c2, c3, dilation=d2)] + [BasicBlock(c3, c3, dilation=d2) for _ in range(blocks[1] - 1)]
        dil4 = [BasicBlock(c3, c3, dilation=d4) for _ in range(blocks[2])]
        self.stages = nn.Sequential(*stage8, *pool1, *dil2, *pool2, *dil4)
        # Degridding: no residual connections, so the dilated stages' checkerboard is filtered
        # out. Kept at stride 32 (where nothing dilates) so both variants have the same depth.
        self.degrid = nn.Sequential(_conv_bn_relu(c3, c3, dilation=d2), _conv_bn_relu(c3, c3, dilation=1))
        self.classifier = nn.Conv2d(c3, num_classes, 1)
        factory = CONTEXTS[context]
        self.context: nn.Module = factory(num_classes) if factory else nn.Identity()
        context_convs = set(self.context.convs) if isinstance(self.context, ContextModule) else set()
        for m in self.modules():
            # The random-init context gets the same (He) initialisation as the front-end: the
            # "standard initialisation" the paper found worse than its identity init.
            if isinstance(m, nn.Conv2d) and (m not in context_convs or context_init == "random"):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m in context_convs:
                    nn.init.zeros_(m.bias)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores at ``output_stride`` (before the upsampling; export heads start here)."""
        return self.context(self.classifier(self.degrid(self.stages(self.stem(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One bilinear Resize to the input size: x8 at stride 8, x32 at stride 32.
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


# The front-end study (Yu & Koltun's comparison at edge_m's width and depth; training/README.md,
# step 8). Its basic-context row is edge_m itself: the same constructor, the same weights file.
def edge_m_os32(num_classes: int = 11) -> EdgeDRN:
    """(a) edge_m pooled to output stride 32 where it dilates, no context module, x32 upsampling."""
    return EdgeDRN(num_classes, (24, 48, 96, 128), (1, 1, 1), output_stride=32, context="none")


def edge_m_nocontext(num_classes: int = 11) -> EdgeDRN:
    """(b) edge_m's dilated front-end at output stride 8 without the context module."""
    return EdgeDRN(num_classes, (24, 48, 96, 128), (1, 1, 1), context="none")


def edge_m_large(num_classes: int = 11) -> EdgeDRN:
    """(d) edge_m with the large context module, identity-initialised as in the paper."""
    return EdgeDRN(num_classes, (24, 48, 96, 128), (1, 1, 1), context="large")


def edge_m_large_randinit(num_classes: int = 11) -> EdgeDRN:
    """(d') edge_m_large with its context module He-initialised like the front-end (no identity)."""
    return EdgeDRN(num_classes, (24, 48, 96, 128), (1, 1, 1), context="large", context_init="random")
