"""The dataset reader: real CamVid, and every malformed folder gets an error naming the file."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dilseg.runtime.dataset import (CAMVID_CLASSES, CAMVID_IGNORE, CAMVID_PALETTE, DatasetError, ImageFolder,
                                    SegmentationDataset, open_images, read_image)
from precision_helpers import CAMVID, needs_camvid, write_pair


def tiny_frame(value: int = 100) -> np.ndarray:
    return np.full((8, 16, 3), value, np.uint8)


def tiny_label(value: int = 1) -> np.ndarray:
    return np.full((8, 16), value, np.uint8)


@needs_camvid
def test_reads_camvid_val_as_bgr_frames_and_class_id_labels() -> None:
    data = SegmentationDataset(CAMVID, "val")
    assert len(data) == len(list((CAMVID / "val" / "images").glob("*.jpg"))) > 0
    image, label = data[0]
    assert image.dtype == np.uint8 and image.shape == (360, 480, 3)
    assert label.dtype == np.uint8 and label.shape == (360, 480)
    assert set(np.unique(label)) <= set(range(len(CAMVID_CLASSES))) | {CAMVID_IGNORE}
    # BGR as every source delivers: the same pixels OpenCV reads, not flipped to RGB.
    assert np.array_equal(image, cv2.imread(str(data.samples[0].image)))
    assert [s.stem for s in data.samples] == sorted(s.stem for s in data.samples)
    assert len(CAMVID_PALETTE) == len(CAMVID_CLASSES) == 11


@needs_camvid
def test_open_images_picks_labelled_split_or_plain_images(tmp_path) -> None:
    assert isinstance(open_images(CAMVID, "val"), SegmentationDataset)
    assert isinstance(open_images(CAMVID / "val"), SegmentationDataset)
    plain = open_images(CAMVID / "val" / "images")
    assert isinstance(plain, ImageFolder) and len(plain) == len(SegmentationDataset(CAMVID, "val"))
    image, label = plain[0]
    assert label is None and image.shape == (360, 480, 3)
    write_pair(tmp_path / "frames", "a", tiny_frame(), None)
    assert isinstance(open_images(tmp_path / "frames"), ImageFolder)  # images/ without labels/


def test_image_without_label_and_label_without_image_are_named(tmp_path) -> None:
    write_pair(tmp_path, "a", tiny_frame(), tiny_label())
    write_pair(tmp_path, "only_image", tiny_frame(), None)
    (tmp_path / "labels").mkdir(exist_ok=True)
    cv2.imwrite(str(tmp_path / "labels" / "only_label.png"), tiny_label())
    with pytest.raises(DatasetError) as err:
        SegmentationDataset(tmp_path, None)
    assert "images without a label: only_image" in str(err.value)
    assert "labels without an image: only_label" in str(err.value)


def test_label_values_outside_the_classes_name_file_and_values(tmp_path) -> None:
    bad = tiny_label(2)
    bad[0, 0], bad[1, 1] = 42, CAMVID_IGNORE  # the void value is fine, 42 is not
    write_pair(tmp_path, "bad", tiny_frame(), bad)
    data = SegmentationDataset(tmp_path, None)
    with pytest.raises(DatasetError, match=r"bad\.png: label values \[42\] are outside 0\.\.10"):
        data[0]
    # The same file is fine for a model with more classes.
    assert SegmentationDataset(tmp_path, None, num_classes=50, ignore_index=255)[0][1][0, 0] == 42


def test_colour_label_png_is_refused_with_its_name(tmp_path) -> None:
    write_pair(tmp_path, "colour", tiny_frame(), np.zeros((8, 16, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"colour\.png: a label map must be 8-bit single-channel class ids"):
        SegmentationDataset(tmp_path, None)[0]


def test_unreadable_image_and_label_are_named(tmp_path) -> None:
    write_pair(tmp_path, "ok", tiny_frame(), tiny_label())
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a jpeg at all")
    cv2.imwrite(str(tmp_path / "labels" / "broken.png"), tiny_label())
    data = SegmentationDataset(tmp_path, None)
    with pytest.raises(DatasetError, match=r"broken\.jpg: cannot be read as an image"):
        data[0]
    (tmp_path / "images" / "broken.jpg").unlink()
    write_pair(tmp_path, "broken", tiny_frame(), None)
    (tmp_path / "labels" / "broken.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DatasetError, match=r"broken\.png: cannot be read as a PNG label map"):
        SegmentationDataset(tmp_path, None)[0]
    with pytest.raises(DatasetError, match=r"missing\.jpg"):
        read_image(tmp_path / "missing.jpg")


def test_image_and_label_of_different_sizes_are_named(tmp_path) -> None:
    write_pair(tmp_path, "odd", tiny_frame(), np.ones((4, 16), np.uint8))
    with pytest.raises(DatasetError, match=r"odd\.png: image is \(8, 16\) but its label is \(4, 16\)"):
        SegmentationDataset(tmp_path, None)[0]


def test_missing_or_empty_folders_say_what_is_expected(tmp_path) -> None:
    with pytest.raises(DatasetError, match="expected images/ and labels/"):
        SegmentationDataset(tmp_path, "val")
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        SegmentationDataset(tmp_path, None)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no pictures here")
    with pytest.raises(DatasetError, match="no images found"):
        open_images(empty)
    with pytest.raises(DatasetError, match="no such folder"):
        open_images(tmp_path / "nope")


def test_split_folder_is_used_when_present(tmp_path) -> None:
    write_pair(tmp_path / "val", "v", tiny_frame(), tiny_label(3))
    write_pair(tmp_path / "train", "t1", tiny_frame(), tiny_label(4))
    write_pair(tmp_path / "train", "t2", tiny_frame(), tiny_label(4))
    assert [s.stem for s in SegmentationDataset(tmp_path, "val").samples] == ["v"]
    assert len(open_images(tmp_path, "train")) == 2


def test_sequences_and_select_split_frames_by_sequence(tmp_path) -> None:
    for stem in ("0001TP_000010", "0001TP_000040", "0006R0_000930", "single"):
        write_pair(tmp_path, stem, tiny_frame(), tiny_label())
    data = SegmentationDataset(tmp_path, None)
    assert data.sequences() == ["0001TP", "0006R0", "single"]
    held = data.select({"0006R0"})
    rest = data.select({"0006R0"}, keep=False)
    assert [s.stem for s in held.samples] == ["0006R0_000930"]
    assert [s.stem for s in rest.samples] == ["0001TP_000010", "0001TP_000040", "single"]
    assert len(data) == 4  # the original keeps every frame
    image, label = held[0]
    assert image.shape == (8, 16, 3) and label.shape == (8, 16)
