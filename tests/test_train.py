"""`dilseg train` on real CamVid images: progress, CSV log, checkpoints, resume, seeds."""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from dilseg.export.train import augment, class_weights

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"
needs_camvid = pytest.mark.skipif(not CAMVID.is_dir(), reason=f"CamVid not found at {CAMVID}")


def train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["--model", "edge_s", "--data", str(CAMVID), "--out", str(out), "--max-train-images", "4",
            "--max-val-images", "3", "--batch-size", "2", "--crop", "64x96", "--threads", "1", *extra]
    return subprocess.run([sys.executable, "-m", "dilseg.runtime.cli", "train", *args], capture_output=True, text=True)


@needs_camvid
def test_train_logs_checkpoints_and_resumes(tmp_path) -> None:
    r = train(tmp_path / "run", "--epochs", "1")
    assert r.returncode == 0, r.stderr
    assert "epoch 1/1" in r.stderr + r.stdout  # tqdm progress goes to stderr
    r = train(tmp_path / "run", "--epochs", "2", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout and "epoch 2/2" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert all(0.0 <= float(row["val_miou"]) <= 1.0 and float(row["train_loss"]) > 0 for row in rows)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("best.safetensors", "last.safetensors", "last.pt"):
        st = (tmp_path / "run" / name).stat()
        assert st.st_size > 0
        # Written through a private temp file, yet readable as a plain open() would leave it.
        assert st.st_mode & 0o777 == 0o666 & ~umask, f"{name}: mode {oct(st.st_mode & 0o777)}"
    assert not list((tmp_path / "run").glob("*.part"))

    # Resuming another model's run is refused in one line, not a traceback.
    r = subprocess.run([sys.executable, "-m", "dilseg.runtime.cli", "train", "--model", "edge_m", "--data", str(CAMVID),
                        "--out", str(tmp_path / "run"), "--epochs", "3", "--resume", "--max-train-images", "4"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "is a edge_s run, not edge_m" in r.stderr and "--out" in r.stderr


@needs_camvid
def test_same_seed_same_weights(tmp_path) -> None:
    for name in ("a", "b"):
        assert train(tmp_path / name, "--epochs", "1", "--seed", "3").returncode == 0
    a, b = (load_file(tmp_path / n / "last.safetensors") for n in ("a", "b"))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_class_weights_favour_rare_classes() -> None:
    labels = [np.array([[0] * 90 + [1] * 9 + [2] * 1 + [11] * 50], np.uint8)]
    w = class_weights(labels, 3, ignore=11)
    assert w[2] > w[1] > w[0]
    assert w[0] == pytest.approx(1 / np.log(1.02 + 0.9), rel=1e-5)


def test_augment_keeps_labels_aligned_and_pads_with_void() -> None:
    image = np.zeros((40, 60, 3), np.uint8)
    label = np.zeros((40, 60), np.uint8)
    image[:, 30:] = 200
    label[:, 30:] = 1
    rng = random.Random(0)
    for _ in range(20):
        img, lab = augment(image, label, (48, 64), (0.75, 1.5), 11, rng)
        assert img.shape == (48, 64, 3) and lab.shape == (48, 64)
        assert set(np.unique(lab)) <= {0, 1, 11}
        # Where the label says class 1 the pixel is bright, class 0 dark (bilinear resizing
        # blurs one column at the edge, so allow it); void is padding.
        bright = img[..., 0] > 100
        assert (bright == (lab == 1))[lab != 11].mean() > 0.95
