"""Named model constructors: the names the CLI, the trainer and the exporter accept."""

from __future__ import annotations

from typing import Callable

from torch import nn

from dilseg.runtime.errors import DilsegError

from .dilation import dilation8_basic, dilation8_large
from .edge import edge_l, edge_m, edge_m_large, edge_m_large_randinit, edge_m_nocontext, edge_m_os32, edge_s

MODELS: dict[str, Callable[[int], nn.Module]] = {
    "edge_s": edge_s,
    "edge_m": edge_m,
    "edge_l": edge_l,
    "dilation8_basic": dilation8_basic,
    "dilation8_large": dilation8_large,
    # The front-end study (training/README.md, step 8): edge_m's front-end at output stride 32
    # without context, at 8 without context, and with the large context (identity or random
    # init); its basic-context row is "edge_m" itself.
    "edge_m_os32": edge_m_os32,
    "edge_m_nocontext": edge_m_nocontext,
    "edge_m_large": edge_m_large,
    "edge_m_large_randinit": edge_m_large_randinit,
}
DEFAULT_MODEL = "edge_m"


class UnknownModelError(DilsegError, ValueError):
    pass


def create_model(name: str, num_classes: int = 11) -> nn.Module:
    """Build a zoo model by name, freshly initialised."""
    if name not in MODELS:
        raise UnknownModelError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return MODELS[name](num_classes)
