"""How a result is drawn: one ``ViewSettings`` for `dilseg run`, the library and every demo viewer."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode

import numpy as np

from .metadata import ModelMeta
from .postprocess import VIEWS, render


@dataclass(frozen=True)
class ViewSettings:
    """What to draw: ``view`` (overlay, mask, side-by-side), the mask opacity ``alpha``, the
    classes to show (``visible``; None means every class) and whether to draw the legend.

    Frozen and hashable, so viewers asking for the same picture share one drawing of it.
    """

    view: str = "overlay"
    alpha: float = 0.5
    visible: tuple[int, ...] | None = None
    legend: bool = False

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {self.view!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be within 0..1, got {self.alpha}")
        if self.visible is not None:
            object.__setattr__(self, "visible", tuple(int(c) for c in self.visible))
        bad = [c for c in self.visible or () if not 0 <= c <= 255]
        if bad:
            raise ValueError(f"class ids must be within 0..255, got {bad}")

    def check_classes(self, num_classes: int) -> None:
        """Refuse ids the model does not have (a hand-edited URL), before any frame is drawn."""
        bad = [c for c in self.visible or () if c >= num_classes]
        if bad:
            raise ValueError(f"the model has classes 0..{num_classes - 1}; got {bad}")

    @property
    def visible_list(self) -> list[int] | None:
        return None if self.visible is None else list(self.visible)

    def render(self, frame: np.ndarray, labels: np.ndarray, meta: ModelMeta,
               lut: np.ndarray | None = None) -> np.ndarray:
        """The BGR picture of ``labels`` over ``frame`` as these settings ask (on the CPU)."""
        return render(frame, labels, meta, self.view, self.alpha, self.visible_list, self.legend, lut)

    def to_query(self) -> str:
        q = {"view": self.view, "alpha": f"{self.alpha:.2f}"}
        if self.visible is not None:
            q["classes"] = ",".join(str(c) for c in self.visible)
        if self.legend:
            q["legend"] = "1"
        return urlencode(q)

    @classmethod
    def from_query(cls, query: str | dict) -> "ViewSettings":
        """Parse what to_query wrote; bad values raise ValueError."""
        if isinstance(query, str):
            query = {k: v[-1] for k, v in parse_qs(query).items()}
        classes = query.get("classes")
        visible = None
        if classes is not None:
            visible = tuple(int(c) for c in classes.split(",") if c != "")
        return cls(view=query.get("view", "overlay"), alpha=float(query.get("alpha", 0.5)), visible=visible,
                   legend=query.get("legend", "0") not in ("0", "", "false"))
