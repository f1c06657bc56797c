"""The launch settings `dilseg demo` hands the app, and the WebRTC configuration.

How each viewer's frames are drawn is ``dilseg.runtime.view.ViewSettings``, the same as `dilseg run`.

The launcher talks to the app through environment variables because `streamlit run`
owns the command line; each has a `dilseg demo` flag that sets it.
"""

from __future__ import annotations

import json
import os

ENV_MODEL = "DILSEG_DEMO_MODEL"  # --model: the model the page starts with
ENV_ICE = "DILSEG_DEMO_ICE_SERVERS"  # --ice-server: JSON list of RTCIceServer dicts
ENV_SOURCE = "DILSEG_DEMO_SOURCE"  # --source: the server source the page suggests


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
