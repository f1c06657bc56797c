"""Yu & Koltun's context module (ICLR 2016, Table 1), basic and large, with identity init.

The module maps C score maps to C score maps through seven 3x3 convolutions with
exponentially growing dilation and a final 1x1. Convolutions are padded by their dilation
so the module keeps the resolution of its input (the paper pads the input instead; the
result is the same map size, and it lets the module sit after any front-end).
"""

from __future__ import annotations


import torch
from torch import nn

# Table 1: (kernel, dilation, relu_after) per layer.
LAYERS: tuple[tuple[int, int, bool], ...] = (
    (3, 1, True),
    (3, 1, True),
    (3, 2, True),
    (3, 4, True),
    (3, 8, True),
    (3, 16, True),
    (3, 1, True),
    (1, 1, False),
)
# Output width of each layer as a multiple of C for the large module (Table 1, last row).
LARGE_MULTIPLIERS: tuple[int, ...] = (2, 2, 4, 8, 16, 32, 32, 1)


def receptive_fields(layers: tuple[tuple[int, int, bool], ...] = LAYERS) -> list[int]:
    """Receptive field (in input pixels, per side length) after each layer."""
    fields, rf = [], 1
    for kernel, dilation, _ in layers:
        rf += (kernel - 1) * dilation
        fields.append(rf)
    return fields


class ContextModule(nn.Module):
    """Context aggregation module; ``widths`` are the output channels of the 8 layers."""

    def __init__(self, num_classes: int, widths: list[int], noise_std: float = 1e-3) -> None:
        super().__init__()
        if len(widths) != len(LAYERS) or widths[-1] != num_classes:
            raise ValueError(f"need {len(LAYERS)} widths ending in {num_classes}, got {widths}")
        self.num_classes = num_classes
        self.noise_std = noise_std
        convs, c_in = [], num_classes
        for (kernel, dilation, _), c_out in zip(LAYERS, widths):
            pad = dilation * (kernel // 2)
            convs.append(nn.Conv2d(c_in, c_out, kernel, padding=pad, dilation=dilation))
            c_in = c_out
        self.convs = nn.ModuleList(convs)
        self.reset_parameters()

    @property
    def widths(self) -> list[int]:
        return [conv.out_channels for conv in self.convs]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's identity initialisation.

        k(t, a->b) = C/c_out at the centre tap when floor(a*C/c_in) == floor(b*C/c_out),
        otherwise small Gaussian noise. With c_in == c_out == C this is exactly the basic
        module's 1[t=0]1[a=b] (no noise: a fresh basic module is the identity).
        """
        C = self.num_classes
        for conv in self.convs:
            c_out, c_in, kh, kw = conv.weight.shape
            basic = c_in == C and c_out == C
            weight = torch.zeros_like(conv.weight)
            if not basic:
                weight.normal_(0.0, self.noise_std * C / c_out)
            a = torch.arange(c_in)
            b = torch.arange(c_out)
            same_group = (a[None, :] * C // c_in) == (b[:, None] * C // c_out)
            centre = weight[:, :, kh // 2, kw // 2]
            centre[same_group] = C / c_out
            conv.weight.copy_(weight)
            conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, (_, _, relu) in zip(self.convs, LAYERS):
            x = conv(x)
            if relu:
                x = torch.relu(x)
        return x


def context_basic(num_classes: int) -> ContextModule:
    """Basic context module: C channels throughout (64C^2 parameters)."""
    return ContextModule(num_classes, [num_classes] * len(LAYERS))


def context_large(num_classes: int) -> ContextModule:
    """Large context module: widths 2C, 2C, 4C, 8C, 16C, 32C, 32C, C."""
    return ContextModule(num_classes, [m * num_classes for m in LARGE_MULTIPLIERS])


