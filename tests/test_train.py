"""`dilseg train` on real CamVid images: the sequence-held-out protocol, augmentation, worker
determinism, checkpoints, resume, refusal to replace a run, and unusable checkpoints."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dilseg.export.augment import Photometric, geometric, photometric
from dilseg.export.train import THIN_CLASSES, TrainConfig, TrainError, class_weights
from dilseg.runtime.classes import PRESETS
from dilseg.export.train import train as train_in_process
from dilseg.export.train_data import CropDataset, EpochSampler, load_pairs, make_split, thin_pixels
from dilseg.runtime.dataset import CAMVID_CLASSES, CAMVID_IGNORE, DatasetError, sequence_of

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"
needs_camvid = pytest.mark.skipif(not CAMVID.is_dir(), reason=f"CamVid not found at {CAMVID}")
RUN_FILES = ("log.csv", "best.safetensors", "last.pt", "last.safetensors")


def train(out: Path, *extra: str, model: str = "edge_s") -> subprocess.CompletedProcess:
    args = ["--model", model, "--data", str(CAMVID), "--out", str(out), "--max-train-images", "4",
            "--max-val-images", "3", "--batch-size", "2", "--crop", "64x96", "--threads", "1", *extra]
    return subprocess.run([sys.executable, "-m", "dilseg.runtime.cli", "train", *args], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})


def tiny(out: Path, **kw) -> TrainConfig:
    """The CLI's tiny run, for in-process training (no interpreter start per run)."""
    base = dict(model="edge_s", data=str(CAMVID), out=str(out), max_train_images=4, max_val_images=3, batch_size=2,
                crop=(64, 96), threads=1)
    return TrainConfig(**{**base, **kw})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in RUN_FILES if (folder / name).exists()}


@needs_camvid
@pytest.mark.parametrize("held", ["0001TP", "0006R0", "0016E5"])
def test_fold_split_holds_out_every_frame_of_the_sequence(held) -> None:
    split = make_split(str(CAMVID), held)
    train_seqs = {sequence_of(s) for s in split.train_stems()}
    assert held not in train_seqs and train_seqs == {"0001TP", "0006R0", "0016E5"} - {held}
    holdout = [s.stem for d in split.holdout for s in d.samples]
    everything = [p.stem for sub in ("train", "val") for p in (CAMVID / sub / "images").glob("*.jpg")]
    assert sorted(holdout) == sorted(s for s in everything if sequence_of(s) == held)
    assert not set(holdout) & set(split.train_stems())
    # The classic val is reported beside it, unchanged.
    assert [s.stem for s in split.val[0].samples] == sorted(p.stem for p in (CAMVID / "val" / "images").glob("*.jpg"))


@needs_camvid
def test_training_on_val_leaves_nothing_between_training_frames_to_select_on() -> None:
    split = make_split(str(CAMVID), "0006R0", ("train", "val"))
    assert split.val == [] and {sequence_of(s) for s in split.train_stems()} == {"0001TP", "0016E5"}
    assert len(split.train_stems()) == 62 + 204 + 101
    with pytest.raises(DatasetError, match=r"no sequence 'Seq05VD'.*0001TP, 0006R0, 0016E5"):
        make_split(str(CAMVID), "Seq05VD")


@needs_camvid
def test_holdout_run_selects_on_the_held_out_sequence(tmp_path) -> None:
    r = train(tmp_path / "run", "--epochs", "3", "--holdout", "0006R0", "--lr", "0.02")
    assert r.returncode == 0, r.stderr
    assert "selecting on holdout" in r.stdout and "held-out 0006R0: 3 frames" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    holdout = [float(row["holdout_miou"]) for row in rows]
    assert all(0 <= float(row["val_miou"]) <= 1 for row in rows)
    report = json.loads((tmp_path / "run" / "best.json").read_text())
    assert report["selected_on"] == "holdout" and report["holdout_sequence"] == "0006R0"
    # The best epoch is the first maximum of the held-out column, whatever val said.
    assert report["epoch"] == 1 + holdout.index(max(holdout))
    assert report["holdout"]["miou"] == pytest.approx(max(holdout), abs=1e-5)
    assert set(report["holdout"]["iou"]) == set(CAMVID_CLASSES)
    with safe_open(str(tmp_path / "run" / "best.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["selected_on"] == "holdout" and meta["epoch"] == str(report["epoch"])

    # The ablation table reads the same folder: recipe, fold, selected score, train time.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from ablation_table import row, table

    r = row(tmp_path / "run")
    assert r["recipe"] == "base" and r["holdout"] == "0006R0" and r["done"] and r["epochs_done"] == 3
    assert r["holdout_miou"] == report["holdout"]["miou"]
    assert f"| {100 * max(holdout):.2f} (ep {report['epoch']}) | +0.00 |" in table([r])


def test_class_weights_favour_rare_classes() -> None:
    labels = [np.array([[0] * 90 + [1] * 9 + [2] * 1 + [11] * 50], np.uint8)]
    w = class_weights(labels, 3, ignore=11)
    assert w[2] > w[1] > w[0]
    assert w[0] == pytest.approx(1 / np.log(1.02 + 0.9), rel=1e-5)


def test_geometry_moves_labels_with_pixels_and_pads_with_void() -> None:
    image = np.zeros((40, 60, 3), np.uint8)
    label = np.zeros((40, 60), np.uint8)
    image[:, 30:] = 200
    label[:, 30:] = 1
    rng = np.random.default_rng(0)
    flips = 0
    for _ in range(30):
        img, lab = geometric(image, label, (48, 64), (0.5, 2.0), 11, rng)
        assert img.shape == (48, 64, 3) and lab.shape == (48, 64)
        assert set(np.unique(lab)) <= {0, 1, 11}
        # Where the label says class 1 the pixel is bright, class 0 dark (bilinear resizing
        # blurs one column at the edge, so allow it); void is padding.
        bright = img[..., 0] > 100
        assert (bright == (lab == 1))[lab != 11].mean() > 0.95
        cols = np.nonzero((lab == 1).any(0))[0]
        flips += bool(len(cols)) and cols[0] == 0 and not (lab[:, -1] == 1).any()
    assert flips > 0  # the bright half appears on the left: mirrored together with its label


def test_centred_crop_contains_the_chosen_pixel() -> None:
    label = np.zeros((360, 480), np.uint8)
    label[300:304, 20:22] = 2  # a thin pole far from the centre
    image = np.zeros((360, 480, 3), np.uint8)
    image[label == 2] = 255
    rng = np.random.default_rng(1)
    hits = sum((geometric(image, label, (128, 128), (0.75, 1.5), 11, rng, centre=(301, 21))[1] == 2).any()
               for _ in range(20))
    assert hits == 20


@needs_camvid
def test_photometric_changes_pixels_not_labels() -> None:
    pairs = load_pairs(make_split(str(CAMVID), "0006R0").train, 2)
    meta = PRESETS["camvid"].model_meta("edge_s")
    plain = CropDataset(pairs, meta, (200, 256), (0.5, 2.0), CAMVID_IGNORE, seed=5)
    photo = CropDataset(pairs, meta, (200, 256), (0.5, 2.0), CAMVID_IGNORE, seed=5, photo=Photometric())
    changed = 0
    for key in [(0, pos, pos % 2, -1) for pos in range(8)]:
        (img_a, lab_a), (img_b, lab_b) = plain.sample(key), photo.sample(key)
        assert np.array_equal(lab_a, lab_b)  # the same geometry, label untouched
        diff = np.abs(img_a.astype(int) - img_b.astype(int))
        changed += diff.mean() > 2
    assert changed >= 6  # jitter_p 0.8: most samples change visibly
    # Each change on its own, on a real frame: pixels move, the mean colour too.
    image = pairs[0][0]
    rng = np.random.default_rng(0)
    for strength in (Photometric(0.3, 0, 0, 0, 1, 0, 1, 0, 1), Photometric(0, 0.5, 0, 0, 1, 0, 1, 0, 1),
                     Photometric(0, 0, 0.8, 0, 1, 0, 1, 0, 1), Photometric(0, 0, 0, 30, 1, 0, 1, 0, 1),
                     Photometric(0, 0, 0, 0, 0, 1, 1.5, 0, 1), Photometric(0, 0, 0, 0, 0, 0, 1, 1, 12)):
        outs = [photometric(image, strength, rng) for _ in range(3)]
        assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
        assert max(np.abs(o.astype(int) - image).mean() for o in outs) > 0.5, strength
    # Hue turns around the colour wheel both ways: red gains green (towards yellow) or blue
    # (towards magenta); grey has no hue or saturation to change.
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 2] = 255
    turned = [tuple(int(v) for v in photometric(red, Photometric(0, 0, 0, 120, 1, 0, 1, 0, 1), rng)[0, 0])
              for _ in range(40)]
    assert any(t[1] > 60 for t in turned) and any(t[0] > 60 for t in turned)
    grey = np.full((4, 4, 3), 100, np.uint8)
    for strength in (Photometric(0, 0, 0, 90, 1, 0, 1, 0, 1), Photometric(0, 0, 0.9, 0, 1, 0, 1, 0, 1)):
        assert all(np.array_equal(photometric(grey, strength, rng), grey) for _ in range(5))


@needs_camvid
def test_rare_class_sampling_puts_thin_classes_in_the_crops() -> None:
    pairs = load_pairs(make_split(str(CAMVID), "0006R0").train, 12)
    ids = tuple(CAMVID_CLASSES.index(c) for c in THIN_CLASSES)
    thin = thin_pixels([lab for _, lab in pairs], ids)
    data = CropDataset(pairs, PRESETS["camvid"].model_meta("edge_s"), (96, 128), (0.75, 1.5), CAMVID_IGNORE, 0, thin=thin)
    keys = list(EpochSampler(len(pairs), 0, thin, thin_p=1.0))
    assert all(k[3] in ids for k in keys)
    assert all((data.sample(k)[1] == k[3]).any() for k in keys)
    plain = list(EpochSampler(len(pairs), 0))
    assert sorted(k[2] for k in plain) == list(range(len(pairs))) and {k[3] for k in plain} == {-1}


@needs_camvid
def test_workers_give_the_same_batches_as_the_main_process() -> None:
    from dilseg.export.train import _loader

    pairs = load_pairs(make_split(str(CAMVID), "0006R0").train, 6)
    cfg = TrainConfig(batch_size=3, crop=(64, 96), scale=(0.5, 2.0), photometric=True, thin_sampling=0.5, seed=2)
    batches = {}
    for workers in (0, 2):
        cfg.workers = workers
        loader, sampler = _loader(cfg, pairs, PRESETS["camvid"].model_meta("edge_s"), CAMVID_IGNORE, 11, torch.device("cpu"))
        got = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            got += [(x.clone(), y.clone()) for x, y in loader]
        batches[workers] = got
    assert len(batches[0]) == 4
    for (xa, ya), (xb, yb) in zip(batches[0], batches[2]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(batches[0][0][0], batches[0][2][0])  # epochs differ


@needs_camvid
def test_train_logs_checkpoints_and_resumes_as_if_never_stopped(tmp_path, capsys) -> None:
    r = train(tmp_path / "run", "--epochs", "2", "--photometric", "--ema", "0.9", "--workers", "1", "--stop-after", "1")
    assert r.returncode == 0, r.stderr
    assert "epoch 1/2" in r.stdout and "stopping after epoch 1 of 2" in r.stdout
    r = train(tmp_path / "run", "--epochs", "2", "--resume", "--photometric", "--ema", "0.9")
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout and "epoch 2/2" in r.stdout and "changed settings" not in r.stdout
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

    # Stopped after epoch 1 of 2 and resumed (with another worker count), the run ends with
    # the weights of one run straight through.
    train_in_process(tiny(tmp_path / "straight", epochs=2, photometric=True, ema=0.9))
    a, b = (load_file(tmp_path / n / "last.safetensors") for n in ("straight", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # A changed schedule is announced; another model's run is refused in one line.
    train_in_process(tiny(tmp_path / "straight", epochs=3, photometric=True, ema=0.9), resume=True)
    assert "changed settings epochs 2 -> 3" in capsys.readouterr().out
    r = train(tmp_path / "run", "--epochs", "3", "--resume", model="edge_m")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "is a edge_s run, not edge_m" in r.stderr and "--out" in r.stderr
    train_in_process(tiny(tmp_path / "h", epochs=1, holdout="0006R0"))
    with pytest.raises(TrainError, match="holdout=0006R0 run, not holdout=0001TP"):
        train_in_process(tiny(tmp_path / "h", epochs=2, holdout="0001TP"), resume=True)


@needs_camvid
def test_existing_run_is_kept_without_resume_or_overwrite(tmp_path) -> None:
    run = tmp_path / "run"
    train_in_process(tiny(run, epochs=1))
    before = snapshot(run)
    assert set(before) == set(RUN_FILES)
    r = train(run, "--epochs", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and f"{run} already holds a run" in r.stderr
    assert "--resume" in r.stderr and "--overwrite" in r.stderr
    assert snapshot(run) == before  # nothing deleted or replaced
    with pytest.raises(TrainError, match="pass one of them"):
        train_in_process(tiny(run, epochs=1), resume=True, overwrite=True)
    assert snapshot(run) == before
    train_in_process(tiny(run, epochs=1, seed=4), overwrite=True)
    assert snapshot(run)["last.pt"] != before["last.pt"]
    assert [row["epoch"] for row in csv.DictReader(open(run / "log.csv"))] == ["1"]


@needs_camvid
def test_unusable_checkpoints_give_one_line_errors(tmp_path) -> None:
    from dilseg.export.zoo import create_model

    run = tmp_path / "run"
    train_in_process(tiny(run, epochs=1))
    good = (run / "last.pt").read_bytes()
    ckpt = torch.load(run / "last.pt", weights_only=False)
    expect = {"truncated": "not a readable checkpoint", "bare": "a bare state dict",
              "mismatch": "its model does not fit this run"}
    for name in expect:
        bad = tmp_path / name
        bad.mkdir()
        for f in ("log.csv", "best.safetensors"):
            (bad / f).write_bytes((run / f).read_bytes())
        if name == "truncated":
            (bad / "last.pt").write_bytes(good[: len(good) // 2])
        elif name == "bare":
            torch.save(ckpt["model"], bad / "last.pt")
        else:  # an edge_s run's checkpoint holding edge_m's tensors: the widths differ
            torch.save({**ckpt, "model": create_model("edge_m").state_dict()}, bad / "last.pt")
        kept = (bad / "last.pt").read_bytes()
        with pytest.raises(TrainError) as err:
            train_in_process(tiny(bad, epochs=2), resume=True)
        message = str(err.value)
        assert "\n" not in message and f"{bad / 'last.pt'}" in message and "--overwrite" in message, message
        assert expect[name] in message, message
        assert (bad / "last.pt").read_bytes() == kept  # the evidence stays as it was
    # Through the CLI: one line on stderr, exit status 2, no traceback.
    r = train(tmp_path / "truncated", "--epochs", "2", "--resume")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "not a readable checkpoint" in r.stderr


def test_ohem_trains_on_the_hard_pixels_only() -> None:
    import torch.nn.functional as F

    from dilseg.export.losses import segmentation_loss

    target = torch.tensor([[[0, 0, 1, 1, 11, 2]]])  # 1x1x6, one void pixel
    logits = torch.full((1, 3, 1, 6), -4.0)
    logits[0, 0, 0, :2] = 4.0  # confidently right: easy
    logits[0, 0, 0, 2:4] = 1.0  # class 1 pixels predicted as 0: hard
    logits[0, 2, 0, 5], logits[0, 0, 0, 5] = 0.5, 0.4  # class 2 barely ahead: p ~0.5 < 0.7, hard
    weight = torch.tensor([1.0, 2.0, 3.0])
    hard = torch.tensor([2, 3, 5])
    per_pixel = F.cross_entropy(logits, target, weight=weight, ignore_index=11, reduction="none")[0, 0]
    expected = per_pixel[hard].sum() / weight[target[0, 0, hard]].sum()
    got = segmentation_loss(logits, target, weight, 11, ohem_p=0.7)
    assert got == pytest.approx(float(expected), rel=1e-6)
    plain = segmentation_loss(logits, target, weight, 11)
    assert float(plain) < float(got)  # the easy pixels no longer dilute the mean
    # With every pixel easy, the hardest 1/16 (at least one) still counts: never an empty mean.
    easy = torch.full((1, 3, 1, 4), -4.0)
    easy[0, 0] = 4.0
    assert torch.isfinite(segmentation_loss(easy, torch.zeros(1, 1, 4, dtype=torch.long), None, 11, ohem_p=0.7))
    smooth = segmentation_loss(logits, target, weight, 11, label_smoothing=0.1)
    assert float(smooth) != pytest.approx(float(plain))


@needs_camvid
@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / ".git").exists(), reason="needs a git checkout (the "
                    "background script trains from a snapshot of HEAD)")
def test_background_plan_resumes_runs_and_skips_finished_ones(tmp_path) -> None:
    script = Path(__file__).resolve().parents[1] / "scripts" / "train_background.sh"
    tiny_args = "--model edge_s --max-train-images 4 --max-val-images 2 --batch-size 2 --crop 64x96 --epochs 2"
    env = {**os.environ, "DATA": str(CAMVID), "RUNS": str(tmp_path / "runs"), "NICE": "0"}

    def plan(text: str) -> subprocess.CompletedProcess:
        (tmp_path / "plan.txt").write_text(text)
        return subprocess.run([str(script)], capture_output=True, text=True, env={**env, "PLAN": str(tmp_path / "plan.txt")})

    run = tmp_path / "runs" / "tiny"
    r = plan(f"# comment\ntiny | {tiny_args} --stop-after 1\n")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stopped before the end" in r.stdout and (run / "last.pt").exists() and not (run / "DONE").exists()
    r = plan(f"tiny | {tiny_args}\ntiny | {tiny_args}\n")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tiny finished (2 epochs" in r.stdout and "skipped" in r.stdout
    assert [row["epoch"] for row in csv.DictReader(open(run / "log.csv"))] == ["1", "2"]
    assert (run / "DONE").exists() and not (run / "last.pt").exists()  # the resume state goes with the schedule
    assert "resumed" in (run / "train.log").read_text()
