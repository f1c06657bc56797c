"""Where the shipped default model lives (inside the installed package)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_FILE = "edge_m_camvid.onnx"


def default_model_path() -> Path:
    """The shipped CamVid ONNX model: `dilseg run`, `dilseg bench` and the demo use it by default."""
    import dilseg.models

    return Path(dilseg.models.__file__).with_name(DEFAULT_MODEL_FILE)
