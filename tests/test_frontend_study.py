"""The front-end study's variants of edge_m (Yu & Koltun's comparison): strides and shapes,
equal front-ends, identity vs random context init, ONNX export agreeing with PyTorch in
ONNX Runtime, the PyTorch backend, a tiny training run each, and the study's table and
picture from run folders (scripts/frontend_study.py)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from dilseg.export.context import ContextModule
from dilseg.export.edge import EdgeDRN
from dilseg.export.heads import HeadError, LabelHead, resolve_head
from dilseg.export.onnx_export import build_onnx, export_onnx
from dilseg.export.train import TrainConfig
from dilseg.export.train import train as train_in_process
from dilseg.export.weights import load_model, save_weights
from dilseg.export.zoo import MODELS, create_model
from dilseg.runtime.backends import open_backend
from dilseg.runtime.classes import PRESETS
from dilseg.runtime.dataset import CAMVID_CLASSES

C = 11
ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "data" / "camvid"
needs_camvid = pytest.mark.skipif(not CAMVID.is_dir(), reason=f"CamVid not found at {CAMVID}")
STUDY = ["edge_m_os32", "edge_m_nocontext", "edge_m", "edge_m_large", "edge_m_large_randinit"]
STRIDE = {"edge_m_os32": 32, "edge_m_nocontext": 8, "edge_m": 8, "edge_m_large": 8, "edge_m_large_randinit": 8}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def with_statistics(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A few train-mode passes: BatchNorm statistics that are not the identity."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(2, 3, 64, 96) * 2 - 1)
    return model.eval()


@pytest.mark.parametrize("name", STUDY)
def test_variants_declare_and_have_their_output_stride(name) -> None:
    model = create_model(name, C).eval()
    assert model.output_stride == STRIDE[name]
    with torch.no_grad():
        for h, w in ((64, 96), (72, 104)):  # 72x104: not a multiple of 32
            x = torch.rand(1, 3, h, w)
            assert model(x).shape == (1, C, h, w)  # bilinear back to the input size, x8 or x32
            s = STRIDE[name]
            assert model.scores(x).shape == (1, C, -(-h // s), -(-w // s))


def test_study_names_are_in_the_zoo_and_c_is_edge_m_itself() -> None:
    assert set(STUDY) <= set(MODELS)
    # (c) is the shipped architecture: the shipped weights load into it strictly.
    shipped = ROOT / "models" / "edge_m_camvid.safetensors"
    if shipped.exists():
        model, info = load_model(shipped)
        assert info["model"] == "edge_m" and isinstance(model.context, ContextModule)
    torch.manual_seed(0)
    a = create_model("edge_m").state_dict()
    torch.manual_seed(0)
    b = EdgeDRN(C, (24, 48, 96, 128), (1, 1, 1), output_stride=8, context="basic", context_init="identity").state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_front_ends_are_equal_in_width_and_depth() -> None:
    os32, dilated, basic, large = (create_model(n) for n in ("edge_m_os32", "edge_m_nocontext", "edge_m", "edge_m_large"))
    shapes = [p.shape for p in dilated.parameters()]
    # Pooling adds no weights: stride 32 and stride 8 differ in resolution only.
    assert [p.shape for p in os32.parameters()] == shapes
    assert [p.shape for p in basic.parameters()][: len(shapes)] == shapes
    assert [p.shape for p in large.parameters()][: len(shapes)] == shapes
    pools = [m for m in os32.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 2 and all(m.kernel_size == 2 and m.stride == 2 for m in pools)
    assert all(m.dilation == (1, 1) for m in os32.modules() if isinstance(m, torch.nn.Conv2d))
    assert sorted({m.dilation[0] for m in dilated.modules() if isinstance(m, torch.nn.Conv2d)}) == [1, 2, 4]
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in dilated.modules())
    assert isinstance(os32.context, torch.nn.Identity) and isinstance(dilated.context, torch.nn.Identity)
    assert basic.context.widths == [C] * 8 and large.context.widths == [2 * C, 2 * C, 4 * C, 8 * C, 16 * C, 32 * C, 32 * C, C]


@pytest.mark.parametrize("name, atol", [("edge_m", 1e-5), ("edge_m_large", 0.05)])
def test_untrained_context_passes_the_front_end_scores_through(name, atol) -> None:
    """Identity init: the model with its fresh context module gives the front-end's scores
    (after the context's ReLUs: the identity holds for non-negative scores)."""
    model = with_statistics(create_model(name, C))
    front = create_model("edge_m_nocontext", C).eval()
    front.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("context.")})
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        ref = torch.relu(front.scores(x))
        out = model.scores(x)
    torch.testing.assert_close(out, ref, atol=atol * float(ref.abs().max()), rtol=0)


def test_random_init_context_is_not_the_identity() -> None:
    torch.manual_seed(0)
    identity = create_model("edge_m_large", C)
    torch.manual_seed(0)
    random = create_model("edge_m_large_randinit", C)
    # Same seed, same front-end weights: only the context's initialisation differs.
    a, b = identity.state_dict(), random.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("context."))
    assert not any(torch.equal(a[k], b[k]) for k in a if k.startswith("context.") and k.endswith("weight"))
    x = torch.nn.functional.one_hot(torch.randint(0, C, (1, 30, 44)), C).permute(0, 3, 1, 2).float() * 3.0
    with torch.no_grad():
        kept, scrambled = identity.context(x), random.context(x)
    assert torch.equal(kept.argmax(1), x.argmax(1))
    assert (scrambled.argmax(1) == x.argmax(1)).float().mean() < 0.5
    assert float((scrambled - x).abs().mean()) > 10 * float((kept - x).abs().mean())


def test_os32_exports_with_the_full_head_and_refuses_the_stride_8_heads() -> None:
    model = create_model("edge_m_os32", C)
    assert resolve_head(model, None) == "full"
    with pytest.raises(HeadError, match="output stride 32.*--head full"):
        resolve_head(model, "half")
    with pytest.raises(HeadError, match="output stride 32"):
        LabelHead(model, "eighth")
    assert resolve_head(create_model("edge_m_nocontext", C), None) == "half"


@pytest.mark.parametrize("name", STUDY)
def test_variants_export_to_onnx_that_agrees_with_torch(tmp_path, name) -> None:
    model = with_statistics(create_model(name, C))
    meta = PRESETS["camvid"].model_meta(name, (64, 96))
    out = tmp_path / f"{name}.onnx"
    check = export_onnx(model, meta, out, (64, 96))  # the default head: half at stride 8, full at 32
    assert check.agreement >= 99.9
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = (np.random.default_rng(1).standard_normal((1, 3, 64, 96))).astype(np.float32)
    head = resolve_head(model, None)
    with torch.no_grad():
        ref = LabelHead(model, head)(torch.from_numpy(x)).numpy()
    labels = sess.run(None, {"input": x})[0]
    assert labels.shape == (1, 64, 96) and labels.dtype == np.int32
    assert (labels == ref).mean() >= 0.999


def test_os32_dynamic_export_verifies_at_sizes_that_are_not_multiples_of_32() -> None:
    model = with_statistics(create_model("edge_m_os32", C))
    _, meta, check = build_onnx(model, PRESETS["camvid"].model_meta("edge_m_os32"), None)
    # build_onnx verifies a dynamic graph at (256 + 64) x (320 + 32): 352 is 11 x 32.
    assert meta.extra["head"] == "full" and check.agreement >= 99.9 and check.max_abs_diff <= 1e-3


def test_cli_export_and_pytorch_backend_run_the_os32_weights(tmp_path) -> None:
    weights = tmp_path / "os32.safetensors"
    save_weights(with_statistics(create_model("edge_m_os32", C)), weights, "edge_m_os32", CAMVID_CLASSES)
    out = tmp_path / "os32.onnx"
    r = subprocess.run([sys.executable, "-m", "dilseg.runtime.cli", "export", "onnx", "--weights", str(weights),
                        "--size", "64x96", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "dilseg.runtime.cli", "export", "onnx", "--weights", str(weights),
                        "--size", "64x96", "--head", "half", "-o", str(tmp_path / "no.onnx")], capture_output=True,
                       text=True)
    assert r.returncode != 0 and "output stride 32" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "no.onnx").exists()
    x = np.random.default_rng(2).standard_normal((1, 3, 64, 96)).astype(np.float32)
    with open_backend(weights, "pytorch", channels_last=False) as torch_backend, open_backend(out) as onnx_backend:
        a, b = torch_backend.infer(x), onnx_backend.infer(x)
    assert a.shape == b.shape == (1, 64, 96)
    assert (a == b).mean() >= 0.999


@needs_camvid
@pytest.mark.parametrize("name", [n for n in STUDY if n != "edge_m"])  # edge_m: tests/test_train.py
def test_each_variant_trains_an_epoch_with_the_held_out_evaluation(tmp_path, name) -> None:
    cfg = TrainConfig(model=name, data=str(CAMVID), out=str(tmp_path / "run"), epochs=1, holdout="0006R0",
                      max_train_images=2, max_val_images=1, batch_size=2, crop=(64, 96), threads=1)
    train_in_process(cfg)
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert len(rows) == 1 and 0 <= float(rows[0]["holdout_miou"]) <= 1
    model, info = load_model(tmp_path / "run" / "best.safetensors")
    assert info["model"] == name and model.output_stride == STRIDE[name]


# --- scripts/frontend_study.py ---------------------------------------------------------------

def fake_run(root: Path, model: str, miou: float, epochs: int = 3, holdout: str = "0006R0") -> Path:
    """A run folder as `dilseg train` leaves it: config.json, log.csv, best.json, best.safetensors."""
    folder = root / f"{model}-base-{holdout}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model": model, "epochs": epochs, "holdout": holdout}))
    with open(folder / "log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "train_loss", "holdout_miou", "val_miou", "lr", "epoch_seconds"])
        for e in range(1, epochs + 1):
            w.writerow([e, 1.0 / e, miou, miou + 0.2, 0.001, 10.0])
    iou = {c: miou for c in CAMVID_CLASSES}
    (folder / "best.json").write_text(json.dumps({"epoch": epochs, "holdout_sequence": holdout,
                                                  "holdout": {"miou": miou, "iou": {**iou, "Pole": miou / 2}},
                                                  "val": {"miou": miou + 0.2, "iou": iou}}))
    save_weights(with_statistics(create_model(model, C)), folder / "best.safetensors", model, CAMVID_CLASSES)
    return folder


def study(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "frontend_study.py"), *args], capture_output=True,
                          text=True)


def test_study_table_from_run_folders(tmp_path) -> None:
    runs = [fake_run(tmp_path, m, v) for m, v in (("edge_m", 0.40), ("edge_m_os32", 0.30), ("edge_m_large", 0.42))]
    r = study(*map(str, runs), "--size", "64x96", "--runs", "2", "--threads", "1")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("| (")]
    # The study's order, whatever the order of the folders; differences to (c).
    assert [line.split("|")[1].strip() for line in lines] == ["(a)", "(c)", "(d)"]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines]
    a, c, d = cells
    assert a[1] == "edge_m_os32" and a[3] == "3/3" and a[4] == "30.00 (ep 3)" and a[5] == "-10.00" and a[6] == "50.00"
    assert a[7] == "15.00" and a[8] == "30.00"  # Pole, SignSymbol
    assert c[5] == "+0.00" and d[5] == "+2.00" and a[11] == "30"  # train s: 3 epochs x 10 s
    flops = {row[1]: float(row[12]) for row in cells}
    assert flops["edge_m_os32"] < flops["edge_m"] < flops["edge_m_large"]
    assert all(float(row[13]) > 0 for row in cells)  # an ORT latency for each (its value is not asserted)


def test_study_refuses_folders_of_other_models(tmp_path) -> None:
    folder = fake_run(tmp_path, "edge_s", 0.3)
    r = study(str(folder), "--runs", "0")
    assert r.returncode != 0 and "not one of the study's" in r.stderr and "Traceback" not in r.stderr


@needs_camvid
def test_study_picture_shows_the_same_held_out_frames_for_a_and_c(tmp_path) -> None:
    runs = [fake_run(tmp_path, m, v) for m, v in (("edge_m_os32", 0.30), ("edge_m", 0.40))]
    png = tmp_path / "card" / "study.png"
    r = study(*map(str, runs), "--runs", "0", "--picture", str(png), "--data", str(CAMVID), "--frames", "2")
    assert r.returncode == 0, r.stderr
    import cv2

    image = cv2.imread(str(png))
    assert image is not None and image.shape[0] > 300 and image.shape[1] > 4 * 200  # 2 rows x 4 columns
    r = study(str(runs[1]), "--runs", "0", "--picture", str(tmp_path / "x.png"), "--data", str(CAMVID))
    assert r.returncode != 0 and "edge_m_os32" in r.stderr and not (tmp_path / "x.png").exists()
