"""What the page passes to the live paths, and the launch settings `dilseg demo` hands the app.

The launcher talks to the app through environment variables because `streamlit run`
owns the command line; each has a `dilseg demo` flag that sets it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode

from dilseg.runtime.postprocess import VIEWS

ENV_MODEL = "DILSEG_DEMO_MODEL"  # --model: the model the page starts with
ENV_ICE = "DILSEG_DEMO_ICE_SERVERS"  # --ice-server: JSON list of RTCIceServer dicts
ENV_SOURCE = "DILSEG_DEMO_SOURCE"  # --source: the server source the page suggests


@dataclass(frozen=True)
class ViewSettings:
    """How one viewer wants its frames drawn. ``visible`` None means every class."""

    view: str = "overlay"
    alpha: float = 0.5
    visible: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {self.view!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be within 0..1, got {self.alpha}")
        bad = [c for c in self.visible or () if not 0 <= c <= 255]
        if bad:
            raise ValueError(f"class ids must be within 0..255, got {bad}")

    def check_classes(self, num_classes: int) -> None:
        """Refuse ids the model does not have (a hand-edited stream URL), before any frame is drawn."""
        bad = [c for c in self.visible or () if c >= num_classes]
        if bad:
            raise ValueError(f"the model has classes 0..{num_classes - 1}; got {bad}")

    @property
    def visible_list(self) -> list[int] | None:
        return None if self.visible is None else list(self.visible)

    def to_query(self) -> str:
        q = {"view": self.view, "alpha": f"{self.alpha:.2f}"}
        if self.visible is not None:
            q["classes"] = ",".join(str(c) for c in self.visible)
        return urlencode(q)

    @classmethod
    def from_query(cls, query: str | dict) -> "ViewSettings":
        """Parse what to_query wrote; bad values raise ValueError (the route answers 400)."""
        if isinstance(query, str):
            query = {k: v[-1] for k, v in parse_qs(query).items()}
        classes = query.get("classes")
        visible = None
        if classes is not None:
            visible = tuple(int(c) for c in classes.split(",") if c != "")
        return cls(view=query.get("view", "overlay"), alpha=float(query.get("alpha", 0.5)), visible=visible)


def ice_servers() -> list[dict]:
    """STUN/TURN servers for the browser-webcam WebRTC link.

    Empty by default: browser and server then connect over host candidates only, which
    works on the same machine or LAN and sends no request anywhere else. Set with
    `dilseg demo --ice-server URL` (or DILSEG_DEMO_ICE_SERVERS as a JSON list of
    {"urls": ..., "username": ..., "credential": ...}) for viewers behind NAT.
    """
    text = os.environ.get(ENV_ICE, "").strip()
    if not text:
        return []
    try:
        servers = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_ICE} is not valid JSON ({exc}); expected a list of {{\"urls\": ...}} objects") from None
    if not isinstance(servers, list) or not all(isinstance(s, dict) and "urls" in s for s in servers):
        raise ValueError(f"{ENV_ICE} must be a JSON list of objects with a \"urls\" key")
    return servers


def rtc_configuration() -> dict:
    return {"iceServers": ice_servers()}
