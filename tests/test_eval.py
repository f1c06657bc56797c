"""`dilseg eval`: exact IoU on a hand-made case, and real CamVid val against a direct computation."""

from __future__ import annotations

import json

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from dilseg.runtime.cli import main
from dilseg.runtime.dataset import CAMVID_IGNORE, DatasetError, SegmentationDataset
from dilseg.runtime.backends import open_backend
from dilseg.runtime.evaluate import dataset_for, evaluate
from precision_helpers import CAMVID, needs_camvid, rgb_argmax_onnx, tiny_onnx, tiny_weights, write_pair

RED, GREEN, BLUE = (0, 0, 255), (0, 255, 0), (255, 0, 0)  # BGR, as files are read


def crafted_case(root):
    """8x16 frame: left half red, right half green over blue. Truth shifts the red/other border two
    columns left and voids row 0, so (on the 112 valid pixels):
      red:   truth 42, predicted 56, overlap 42 -> IoU 42/56 = 0.75, recall 1
      green: truth 30, predicted 24, overlap 24 -> IoU 24/30 = 0.80, recall 0.8
      blue:  truth 40, predicted 32, overlap 32 -> IoU 32/40 = 0.80, recall 0.8
    pixel accuracy 98/112 = 0.875, class accuracy (1 + 0.8 + 0.8)/3."""
    image = np.zeros((8, 16, 3), np.uint8)
    image[:, :8] = RED
    image[:4, 8:] = GREEN
    image[4:, 8:] = BLUE
    label = np.zeros((8, 16), np.uint8)
    label[:4, 6:] = 1
    label[4:, 6:] = 2
    label[0] = 3  # void
    write_pair(root, "crafted", image, label)
    return image, label


def test_eval_reproduces_hand_computed_iou(tmp_path) -> None:
    crafted_case(tmp_path / "data" / "val")
    model = rgb_argmax_onnx(tmp_path / "rgb.onnx")
    out = tmp_path / "scores.json"
    assert main(["eval", "--model", str(model), "--data", str(tmp_path / "data"), "--json", str(out),
                 "--no-progress"]) == 0
    d = json.loads(out.read_text())
    assert d["iou"] == {"red": 75.0, "green": 80.0, "blue": 80.0}
    assert d["miou"] == pytest.approx(100 * (0.75 + 0.8 + 0.8) / 3, abs=1e-4)
    assert d["pixel_accuracy"] == pytest.approx(87.5)
    assert d["class_accuracy"] == pytest.approx(100 * 2.6 / 3, abs=1e-4)
    assert d["pixels"] == 112 and d["images"] == 1
    assert np.array_equal(d["confusion"], [[42, 0, 0], [6, 24, 0], [8, 0, 32]])


def test_eval_accumulates_over_images_and_shows_absent_classes_as_blank(tmp_path, capsys) -> None:
    root = tmp_path / "data"
    crafted_case(root)
    # A second, all-red frame fully labelled red adds 128 correct red pixels.
    write_pair(root, "z_red", np.full((8, 16, 3), RED, np.uint8), np.zeros((8, 16), np.uint8))
    backend = open_backend(rgb_argmax_onnx(tmp_path / "rgb.onnx"))
    result = evaluate(backend, dataset_for(backend.meta, root, None), progress=False)
    assert result.images == 2
    assert result.scores.iou[0] == pytest.approx(170 / 184)  # (42+128) / (42+128 + 14 wrong)
    # Only the all-red frame: green and blue never occur, their IoU is undefined, not 0.
    only_red = tmp_path / "red"
    write_pair(only_red, "r", np.full((8, 16, 3), RED, np.uint8), np.zeros((8, 16), np.uint8))
    result = evaluate(backend, dataset_for(backend.meta, only_red, None), progress=False)
    assert result.scores.iou[0] == 1.0 and np.isnan(result.scores.iou[1:]).all() and result.scores.miou == 1.0
    assert main(["eval", "--model", str(tmp_path / "rgb.onnx"), "--data", str(only_red), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "red" in table and "100.00" in table and "green" in table and " -" in table


def direct_scores(session: ort.InferenceSession, data: SegmentationDataset, n: int, size, mean, std):
    """Independent of the runtime: own resize, normalisation, argmax and IoU formulas."""
    tp = np.zeros(11)
    fp = np.zeros(11)
    fn = np.zeros(11)
    correct = valid_total = 0
    for i in range(n):
        image, label = data[i]
        small = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        rgb = small[:, :, ::-1].astype(np.float32) / 255.0
        x = ((rgb - np.array(mean, np.float32)) / np.array(std, np.float32)).transpose(2, 0, 1)[None]
        labels = session.run(None, {"input": x.astype(np.float32)})[0][0].astype(np.uint8)
        pred = cv2.resize(labels, (label.shape[1], label.shape[0]), interpolation=cv2.INTER_NEAREST)
        valid = label != CAMVID_IGNORE
        for c in range(11):
            p, t = (pred == c) & valid, (label == c) & valid
            tp[c] += (p & t).sum()
            fp[c] += (p & ~t).sum()
            fn[c] += (~p & t).sum()
        correct += ((pred == label) & valid).sum()
        valid_total += valid.sum()
    union = tp + fp + fn
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return iou, correct / valid_total, valid_total


@needs_camvid
def test_eval_on_camvid_val_matches_direct_computation(tmp_path_factory, tmp_path) -> None:
    model = tiny_onnx(tmp_path_factory)
    n = 6
    out = tmp_path / "val.json"
    assert main(["eval", "--model", str(model), "--data", str(CAMVID), "--split", "val", "--limit", str(n),
                 "--json", str(out), "--no-progress"]) == 0
    d = json.loads(out.read_text())
    backend = open_backend(model)
    iou, pixel_acc, pixels = direct_scores(ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]),
                                           SegmentationDataset(CAMVID, "val"), n, backend.meta.input_size,
                                           backend.meta.mean, backend.meta.std)
    got = np.array([np.nan if v is None else v for v in d["iou"].values()])
    assert np.allclose(got, 100 * iou, equal_nan=True, atol=1e-3)
    assert d["miou"] == pytest.approx(100 * np.nanmean(iou), abs=1e-3)
    assert d["pixel_accuracy"] == pytest.approx(100 * pixel_acc, abs=1e-3)
    assert d["pixels"] == pixels and d["images"] == n and d["precision"] == "fp32"
    # Sane for a model fitted for seconds: well above chance, far from perfect.
    assert 8 < d["miou"] < 80 and 50 < d["pixel_accuracy"] < 99
    assert 0 <= d["class_accuracy"] <= 100


@needs_camvid
def test_eval_of_weights_runs_pytorch_with_the_same_processing(tmp_path_factory) -> None:
    weights = tiny_weights(tmp_path_factory)
    onnx_model = tiny_onnx(tmp_path_factory)
    data = SegmentationDataset(CAMVID, "val")
    # At the ONNX's input size and with its label head, PyTorch and ONNX Runtime score the
    # same up to float noise (the paper's full head differs along boundaries, which on a model
    # fitted for seconds moves the score by more than noise).
    onnx_backend = open_backend(onnx_model)
    head = onnx_backend.meta.extra["head"]
    torch_result = evaluate(open_backend(weights, input_size=(64, 96), head=head), data, limit=3, progress=False)
    onnx_result = evaluate(onnx_backend, data, limit=3, progress=False)
    assert torch_result.meta.model == "edge_s" and torch_result.meta.weights_sha256
    assert torch_result.scores.miou == pytest.approx(onnx_result.scores.miou, abs=2e-3)


def test_eval_needs_labels_and_names_bad_label_values(tmp_path, capsys) -> None:
    model = rgb_argmax_onnx(tmp_path / "rgb.onnx")
    write_pair(tmp_path / "frames", "f", np.zeros((8, 16, 3), np.uint8), None)
    assert main(["eval", "--model", str(model), "--data", str(tmp_path / "frames"), "--no-progress"]) == 2
    assert "no labels/ folder" in capsys.readouterr().err
    # A 3-class model on 11-class labels: the label file and its foreign values are named.
    write_pair(tmp_path / "eleven", "street", np.zeros((8, 16, 3), np.uint8), np.full((8, 16), 7, np.uint8))
    assert main(["eval", "--model", str(model), "--data", str(tmp_path / "eleven"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "street.png: label values [7] are outside 0..2" in err
    with pytest.raises(DatasetError, match="no such folder"):
        dataset_for(open_backend(model).meta, tmp_path / "nowhere", "val")
    assert main(["eval", "--model", str(tmp_path / "missing.onnx"), "--data", str(tmp_path), "--no-progress"]) == 2
    assert "missing.onnx: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "verify"])
@pytest.mark.parametrize("limit, message", [("-1", "must be >= 0, got -1"), ("two", "must be a whole number >= 0, got 'two'")])
def test_limit_is_refused_by_both_commands_before_any_work(command, limit, message, tmp_path, capsys) -> None:
    models = ["--model", str(tmp_path / "missing.onnx")] if command == "eval" else ["a.onnx", "b.onnx"]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *models, "--data", str(tmp_path), "--limit", limit])
    assert exit_info.value.code == 2
    assert f"argument --limit: {message}" in capsys.readouterr().err


def test_eval_help_teaches_with_examples(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "dilseg eval --model" in capsys.readouterr().out


BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _NoTorch())
from dilseg.runtime.cli import main
"""


def test_eval_and_verify_of_onnx_need_no_torch(tmp_path) -> None:
    import subprocess
    import sys

    crafted_case(tmp_path / "data")
    model = rgb_argmax_onnx(tmp_path / "rgb.onnx")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\0" * 16)
    code = BLOCK_TORCH + f"""
rc = main(["eval", "--model", {str(model)!r}, "--data", {str(tmp_path / "data")!r}, "--no-progress"])
rc |= main(["verify", {str(model)!r}, {str(model)!r}, "--data", {str(tmp_path / "data")!r}, "--no-progress",
            "--min-agreement", "100"])
print("RC", rc, "TORCH", "torch" in sys.modules)
rc = main(["eval", "--model", {str(weights)!r}, "--data", {str(tmp_path / "data")!r}])
print("WEIGHTS_RC", rc)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "RC 0 TORCH False" in r.stdout, r.stderr
    # Weights need PyTorch: without it the user is told so, in one line.
    assert "WEIGHTS_RC 2" in r.stdout and "needs PyTorch" in r.stderr and "Traceback" not in r.stderr
