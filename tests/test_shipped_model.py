"""Guards on the shipped default model (models/edge_m_camvid.*).

The model card's figures are the contract: the shipped ONNX must still reach the card's
CamVid val mIoU through today's runtime, and re-exporting the shipped weights with today's
exporter must give the same masks as the shipped ONNX.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dilseg.runtime.artifact import read_meta
from dilseg.runtime.dataset import CAMVID_CLASSES, SegmentationDataset
from dilseg.runtime.defaults import default_model_path
from dilseg.runtime.backends import open_backend
from dilseg.runtime.evaluate import evaluate, verify

from precision_helpers import CAMVID, needs_camvid

MODELS = Path(__file__).resolve().parents[1] / "models"
ONNX = MODELS / "edge_m_camvid.onnx"
WEIGHTS = MODELS / "edge_m_camvid.safetensors"
CARD_METRICS = MODELS / "edge_m_camvid.metrics.json"


def test_shipped_files_exist_and_are_the_default() -> None:
    for path in (ONNX, WEIGHTS, CARD_METRICS, MODELS / "edge_m_camvid.md", MODELS / "edge_m_camvid_curve.png"):
        assert path.is_file() and path.stat().st_size > 0, f"{path} is not shipped"
    assert default_model_path().resolve() == ONNX.resolve()
    meta = read_meta(ONNX)
    assert meta.model == "edge_m"
    assert tuple(meta.classes) == CAMVID_CLASSES
    assert meta.input_size == (360, 480)
    assert meta.output_kind == "labels"


@needs_camvid
@pytest.mark.slow
def test_shipped_onnx_reaches_the_card_miou_on_camvid_val() -> None:
    card = json.loads(CARD_METRICS.read_text())
    backend = open_backend(ONNX)
    try:
        result = evaluate(backend, SegmentationDataset(CAMVID, "val"), progress=False)
    finally:
        backend.close()
    assert result.images == 101
    miou = 100.0 * result.scores.miou
    assert miou >= card["val_miou"] - 0.5, (
        f"shipped ONNX scores {miou:.2f}% mIoU on CamVid val, the model card says {card['val_miou']:.2f}%")


@needs_camvid
@pytest.mark.slow
def test_reexported_shipped_weights_agree_with_shipped_onnx(tmp_path: Path) -> None:
    out = tmp_path / "reexport.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "dilseg.runtime.cli", "export", "onnx", "--weights", str(WEIGHTS),
         "--size", "360x480", "-o", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    shipped, fresh = open_backend(ONNX), open_backend(out)
    try:
        result = verify(shipped, fresh, SegmentationDataset(CAMVID, "val"), progress=False)
    finally:
        shipped.close()
        fresh.close()
    assert result.images == 101
    assert result.agreement >= 99.9, f"re-exported weights agree with the shipped ONNX on {result.agreement:.3f}% of pixels"
