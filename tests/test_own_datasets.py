"""Datasets with their own classes: images/ + labels/ with a classes file, and Cityscapes' own
layout (leftImg8bit/ + gtFine/*_labelIds.png -> 19 train ids), built here from real CamVid
frames and labels; eval and verify of imported models on them, and each bad dataset refused
with an error naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from precision_helpers import CAMVID, needs_camvid

from dilseg.runtime.classes import CITYSCAPES_TRAIN_IDS, PRESETS, ClassesError
from dilseg.runtime.cli import main
from dilseg.runtime.dataset import (CityscapesDataset, DatasetError, SegmentationDataset, list_images,
                                    open_dataset, open_images)

pytestmark = [needs_camvid, pytest.mark.usefixtures("one_torch_thread")]
SIZE = (64, 96)
# CamVid id -> Cityscapes label id (labels.py): Sky 23, Building 11, Pole 17, Road 7, Sidewalk 8,
# Tree 21 (vegetation), SignSymbol 20, Fence 13, Car 26, Pedestrian 24, Bicyclist 25 (rider); void -> 0.
CAMVID_TO_CITYSCAPES_ID = np.array([23, 11, 17, 7, 8, 21, 20, 13, 26, 24, 25] + [0] * 245, np.uint8)
# A three-class dataset of its own: road, sky, everything else; CamVid's void stays void (255).
CAMVID_TO_OWN = np.array([1, 2, 2, 0, 2, 2, 2, 2, 2, 2, 2, 255] + [255] * 244, np.uint8)


def camvid_pairs(n: int = 4) -> list[tuple[str, np.ndarray, np.ndarray]]:
    data = SegmentationDataset(CAMVID, "val")
    picks = range(0, len(data), len(data) // n)
    return [(data.samples[i].stem, *data[i]) for i in list(picks)[:n]]


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own")
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir()
        for stem, image, label in camvid_pairs():
            cv2.imwrite(str(root / split / "images" / f"{stem}.png"), image)
            cv2.imwrite(str(root / split / "labels" / f"{stem}.png"), CAMVID_TO_OWN[label])
    (root / "classes.txt").write_text("road 128 64 128\nsky 70 130 180\nother\nignore_index: 255\n")
    return root


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cityscapes")
    for split in ("train", "val"):
        img_dir, gt_dir = root / "leftImg8bit" / split / "seattle", root / "gtFine" / split / "seattle"
        img_dir.mkdir(parents=True)
        gt_dir.mkdir(parents=True)
        for i, (_, image, label) in enumerate(camvid_pairs()):
            stem = f"seattle_000000_{i:06d}"
            cv2.imwrite(str(img_dir / f"{stem}_leftImg8bit.png"), image)
            cv2.imwrite(str(gt_dir / f"{stem}_gtFine_labelIds.png"), CAMVID_TO_CITYSCAPES_ID[label])
    return root


def test_own_classes_file_gives_the_dataset_its_classes_and_void(own) -> None:
    data = open_dataset(own, "val")
    assert data.classes.names == ("road", "sky", "other") and data.ignore_index == 255 and data.num_classes == 3
    _, label = data[0]
    assert set(np.unique(label)) <= {0, 1, 2, 255} and (label == 0).any() and (label == 1).any()


def test_cityscapes_label_ids_become_train_ids(cityscapes) -> None:
    data = open_dataset(cityscapes, "val")
    assert isinstance(data, CityscapesDataset) and data.classes == PRESETS["cityscapes"] and len(data) == 4
    ids = cv2.imread(str(data.samples[0].label), cv2.IMREAD_UNCHANGED)
    train = data.read_label(0)
    for label_id in np.unique(ids):
        want = CITYSCAPES_TRAIN_IDS.get(int(label_id), 255)
        assert (train[ids == label_id] == want).all()
    assert data.classes.names[int(train[ids == 7][0])] == "road"
    assert data.sequences() == ["seattle_000000"]


def _adopted(tmp: Path, num_labels: int, classes: str) -> Path:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import foreign_models as fm

    from dilseg.export.onnx_import import adopt, write_adopted
    from dilseg.runtime.classes import load_classes

    torch.manual_seed(0)
    src = fm.user_export(fm.Logits(fm.lively(fm.segformer(num_labels), SIZE)), tmp / f"seg{num_labels}.onnx", SIZE,
                         dynamo=False)
    out = tmp / f"seg{num_labels}_dilseg.onnx"
    write_adopted(adopt(src, load_classes(classes)), out)
    return out


def test_eval_and_verify_on_own_and_cityscapes_datasets(own, cityscapes, tmp_path, capsys) -> None:
    three = _adopted(tmp_path, 3, str(own / "classes.txt"))
    assert main(["eval", "--model", str(three), "--data", str(own), "--no-progress", "--json",
                 str(tmp_path / "own.json")]) == 0
    result = json.loads((tmp_path / "own.json").read_text())
    assert result["images"] == 4 and set(result["iou"]) == {"road", "sky", "other"}
    nineteen = _adopted(tmp_path, 19, "cityscapes")
    assert main(["eval", "--model", str(nineteen), "--data", str(cityscapes), "--no-progress"]) == 0
    assert "traffic light" in capsys.readouterr().out
    assert main(["verify", str(nineteen), str(nineteen), "--data", str(cityscapes), "--no-progress",
                 "--min-agreement", "100"]) == 0
    # An 11-class model on the 3-class data, a 3-class one on Cityscapes: refused, naming the data.
    for model, data, phrase in ((nineteen, own, "classes.txt lists 3"), (three, cityscapes, "is Cityscapes")):
        capsys.readouterr()
        assert main(["eval", "--model", str(model), "--data", str(data), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "class counts differ" in err and phrase in err and len(err.strip().splitlines()) == 1


def test_bad_datasets_name_the_file(own, cityscapes, tmp_path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(own, bad)
    label = bad / "val" / "labels" / sorted(p.name for p in (bad / "val" / "labels").iterdir())[0]
    cv2.imwrite(str(label), np.full((360, 480), 7, np.uint8))
    data = open_dataset(bad, "val")
    with pytest.raises(DatasetError, match=rf"{label.name}: label values \[7\] are outside 0..2 and not the void value 255"):
        data.read_label(0)
    image = bad / "val" / "images" / label.name
    image.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=rf"{image.name}: cannot be read as an image"):
        data.read_image(0)
    (bad / "classes.txt").write_text("road\nroad\n")
    with pytest.raises(ClassesError, match="classes.txt:2: duplicate class name 'road'"):
        open_dataset(bad, "val")
    (bad / "classes.txt").write_text("road\nsky\n")
    with pytest.raises(DatasetError, match=r"class counts differ: the model has 3 classes, .*classes.txt lists 2"):
        open_images(bad, "val", 3, 255)

    cs = tmp_path / "cs"
    shutil.copytree(cityscapes, cs)
    gt = sorted((cs / "gtFine" / "val" / "seattle").iterdir())[0]
    cv2.imwrite(str(gt), np.full((360, 480), 40, np.uint8))
    with pytest.raises(DatasetError, match=rf"{gt.name}: label ids \[40\] are not Cityscapes label ids"):
        open_dataset(cs, "val").read_label(0)
    assert len(list_images(own / "val" / "images")) == 4  # the originals are untouched


def test_int8_calibration_reads_a_cityscapes_root(cityscapes) -> None:
    from dilseg.export.quantize import calibration_images

    picks = calibration_images(cityscapes, 3)
    assert len(picks) == 3 and all(p.parent.parent == cityscapes / "leftImg8bit" / "train" for p in picks)


def test_train_export_and_eval_on_datasets_with_their_own_classes(own, cityscapes, tmp_path, capsys) -> None:
    pytest.importorskip("torch")
    from dilseg.export.torch_backend import weights_meta
    from dilseg.export.train import TrainConfig, train
    from dilseg.export.weights import read_weights_info
    from dilseg.runtime.artifact import read_onnx_meta

    for data, classes, void in ((own, ("road", "sky", "other"), 255), (cityscapes, PRESETS["cityscapes"].names, 255)):
        out = tmp_path / data.name
        cfg = TrainConfig(model="edge_s", data=str(data), out=str(out), epochs=1, batch_size=2, crop=(64, 96),
                          threads=1, max_train_images=2, max_val_images=2)
        weights = train(cfg)
        info = read_weights_info(weights)
        assert tuple(info["classes"]) == classes and info["ignore_index"] == str(void)
        onnx_path = tmp_path / f"{data.name}.onnx"
        assert main(["export", "onnx", "--weights", str(weights), "--size", "64x96", "-o", str(onnx_path)]) == 0
        meta = read_onnx_meta(onnx_path)
        assert meta.classes == classes and meta.ignore_index == void
        # The weights run on PyTorch (run, eval, verify) with the classes their graph carries.
        on_torch = weights_meta(weights)
        assert (on_torch.classes, on_torch.palette, on_torch.ignore_index) == (meta.classes, meta.palette, void)
        if data == own:
            assert meta.palette[:2] == ((128, 64, 128), (70, 130, 180))
        else:
            assert meta.palette == PRESETS["cityscapes"].palette
        capsys.readouterr()
        assert main(["eval", "--model", str(onnx_path), "--data", str(data), "--limit", "2", "--no-progress"]) == 0
        assert classes[-1] in capsys.readouterr().out
