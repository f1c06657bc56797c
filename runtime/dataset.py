"""Labelled segmentation datasets on disk: ``images/`` and ``labels/`` matched by file stem.

CamVid (11 classes, void = 11) is the one the project trains on; its class names and
palette travel into every exported artifact. A dataset of other classes says which in a
classes file at its root (``classes.txt``/``.json``/``.yaml``, see runtime/classes.py), and
Cityscapes is read in its own layout (``leftImg8bit/`` + ``gtFine/*_labelIds.png``, label ids
mapped to the 19 train ids).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import cv2
import numpy as np

from .classes import CITYSCAPES_TRAIN_IDS, PRESETS, ClassList, load_classes
from .errors import DilsegError

CAMVID_CLASSES: tuple[str, ...] = PRESETS["camvid"].names
CAMVID_PALETTE: tuple[tuple[int, int, int], ...] = PRESETS["camvid"].palette
CAMVID_IGNORE = 11
DEFAULT_VOID = 255  # the void label of a classes file that names none
CLASSES_FILES = ("classes.txt", "classes.json", "classes.yaml", "classes.yml")
# Image files OpenCV decodes: one list for datasets, calibration folders and image/folder sources.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jp2")


class DatasetError(DilsegError, ValueError):
    """A dataset folder is missing, incomplete, or holds a file that cannot be used."""


@dataclass(frozen=True)
class Sample:
    stem: str
    image: Path
    label: Path | None


def sequence_of(stem: str) -> str:
    """The video sequence a frame belongs to: CamVid stems are ``<sequence>_<frame>``.

    A stem without an underscore is its own sequence, so a dataset of unrelated images
    still splits (each image alone).
    """
    return stem.rsplit("_", 1)[0] if "_" in stem else stem


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class SegmentationDataset:
    """A split of a labelled dataset: ``root/split/images`` + ``root/split/labels``.

    ``root`` may also point straight at a folder holding images/ and labels/. Every image
    must have a label with the same stem and vice versa; the error names the odd files.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = "val",
        num_classes: int = len(CAMVID_CLASSES),
        ignore_index: int = CAMVID_IGNORE,
    ) -> None:
        root = Path(root)
        base = root / split if split and (root / split / "images").is_dir() else root
        self.image_dir, self.label_dir = base / "images", base / "labels"
        if not self.image_dir.is_dir() or not self.label_dir.is_dir():
            raise DatasetError(
                f"{root}: expected images/ and labels/ folders"
                + (f" (or {split}/images and {split}/labels)" if split else "")
                + "; point --data at a dataset root such as ../shared/data/camvid"
            )
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.classes: ClassList | None = None  # names and colours, where the dataset says them
        images = {p.stem: p for p in list_images(self.image_dir)}
        labels = {p.stem: p for p in self.label_dir.iterdir() if p.suffix.lower() == ".png"}
        self.samples = match_samples(images, labels, self.image_dir)

    def __len__(self) -> int:
        return len(self.samples)

    def sequences(self) -> list[str]:
        """The sequences (see ``sequence_of``) present in this split, sorted."""
        return sorted({sequence_of(s.stem) for s in self.samples})

    def select(self, sequences: set[str] | frozenset[str], keep: bool = True) -> "SegmentationDataset":
        """A copy holding only the frames of ``sequences`` (``keep=False``: all but those)."""
        part = copy.copy(self)
        part.samples = [s for s in self.samples if (sequence_of(s.stem) in sequences) == keep]
        return part

    def read_image(self, i: int) -> np.ndarray:
        """BGR uint8 image (OpenCV's order, as every source delivers frames)."""
        return read_image(self.samples[i].image)

    def read_label(self, i: int) -> np.ndarray:
        path = self.samples[i].label
        label = read_label_png(path)
        bad = (label >= self.num_classes) & (label != self.ignore_index)
        if bad.any():
            values = sorted(set(np.unique(label[bad]).tolist()))
            raise DatasetError(
                f"{path}: label values {values[:8]} are outside 0..{self.num_classes - 1} and not the void value {self.ignore_index}"
            )
        return label

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.read_image(i), self.read_label(i)
        if image.shape[:2] != label.shape:
            raise DatasetError(f"{self.samples[i].image}: image is {image.shape[:2]} but its label is {label.shape}")
        return image, label

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]


def match_samples(images: dict[str, Path], labels: dict[str, Path], where: Path) -> list[Sample]:
    """Image/label pairs by stem; images without a label (or labels without an image) are an error."""
    if not images:
        raise DatasetError(f"{where}: no images ({', '.join(IMAGE_SUFFIXES)})")
    no_label = sorted(set(images) - set(labels))
    no_image = sorted(set(labels) - set(images))
    if no_label or no_image:
        parts = []
        if no_label:
            parts.append(f"images without a label: {', '.join(no_label[:5])}" + (" ..." if len(no_label) > 5 else ""))
        if no_image:
            parts.append(f"labels without an image: {', '.join(no_image[:5])}" + (" ..." if len(no_image) > 5 else ""))
        raise DatasetError(f"{where.parent}: unmatched files; " + "; ".join(parts))
    return [Sample(stem, images[stem], labels[stem]) for stem in sorted(images)]


def read_label_png(path: str | Path) -> np.ndarray:
    """An 8-bit single-channel label map, or a DatasetError naming the file."""
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise DatasetError(f"{path}: cannot be read as a PNG label map")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise DatasetError(f"{path}: a label map must be 8-bit single-channel class ids (not a colour image), "
                           f"got shape {label.shape} {label.dtype}")
    return label


class CityscapesDataset(SegmentationDataset):
    """Cityscapes in its own layout: ``leftImg8bit/SPLIT/CITY/*_leftImg8bit.png`` with
    ``gtFine/SPLIT/CITY/*_gtFine_labelIds.png``. Label ids become the 19 train ids of
    cityscapesScripts' labels.py; every other id (void, parking, rail track, ...) is 255."""

    IMAGE_TAIL, LABEL_TAIL = "_leftImg8bit.png", "_gtFine_labelIds.png"

    def __init__(self, root: str | Path, split: str | None = "val") -> None:
        root = Path(root)
        split = split or "val"
        self.image_dir, self.label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        if not self.image_dir.is_dir() or not self.label_dir.is_dir():
            raise DatasetError(f"{root}: a Cityscapes root needs leftImg8bit/{split}/ and gtFine/{split}/")
        self.classes = PRESETS["cityscapes"]
        self.num_classes, self.ignore_index = len(self.classes), DEFAULT_VOID
        images = {p.name[: -len(self.IMAGE_TAIL)]: p for p in self.image_dir.glob(f"*/*{self.IMAGE_TAIL}")}
        labels = {p.name[: -len(self.LABEL_TAIL)]: p for p in self.label_dir.glob(f"*/*{self.LABEL_TAIL}")}
        self.samples = match_samples(images, labels, self.image_dir)
        self.lut = np.full(256, DEFAULT_VOID, np.uint8)
        for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
            self.lut[label_id] = train_id

    def read_label(self, i: int) -> np.ndarray:
        path = self.samples[i].label
        ids = read_label_png(path)
        if int(ids.max(initial=0)) > 33:  # labels.py defines ids 0..33 (license plate, -1, is never drawn)
            values = sorted(set(np.unique(ids[ids > 33]).tolist()))
            raise DatasetError(f"{path}: label ids {values[:8]} are not Cityscapes label ids (0..33); gtFine "
                               "*_labelIds.png holds label ids, not train ids or colours")
        return self.lut[ids]


def is_cityscapes(root: str | Path) -> bool:
    return (Path(root) / "leftImg8bit").is_dir() and (Path(root) / "gtFine").is_dir()


def dataset_classes(root: str | Path) -> ClassList | None:
    """The classes file at a dataset's root (classes.txt / .json / .yaml), if it has one."""
    for name in CLASSES_FILES:
        path = Path(root) / name
        if path.is_file():
            return load_classes(path)
    return None


def open_dataset(root: str | Path, split: str | None = "val", classes: ClassList | None = None) -> SegmentationDataset:
    """A labelled split with its classes: Cityscapes' layout, or images/ + labels/ with the
    classes of ``classes``, else of the root's classes file, else CamVid's."""
    root = Path(root)
    if is_cityscapes(root):
        data = CityscapesDataset(root, split)
        if classes is not None:
            check_same_classes(classes, data.classes, f"{root} (Cityscapes, 19 train ids)")
        return data
    own = dataset_classes(root)
    if classes is not None and own is not None:
        check_same_classes(classes, own, own.source)
    classes = classes or own or PRESETS["camvid"]
    void = classes.ignore_index if classes.ignore_index is not None else DEFAULT_VOID
    data = SegmentationDataset(root, split, len(classes), void)
    data.classes = classes
    return data


def check_same_classes(want: ClassList | tuple[str, ...], have: ClassList, where: str) -> None:
    """Class i must mean the same on both sides (names compared without case)."""
    names = want.names if isinstance(want, ClassList) else tuple(want)
    if len(names) != len(have.names):
        raise DatasetError(f"class counts differ: the model has {len(names)} classes, {where} has {len(have.names)}")
    for i, (a, b) in enumerate(zip(names, have.names)):
        if a.casefold() != b.casefold():
            raise DatasetError(f"class {i} is {a!r} for the model but {b!r} in {where}; the ids must mean the same classes")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as BGR uint8 or raise a DatasetError naming the file."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"{path}: cannot be read as an image (missing, unreadable or not an image)")
    return image


class ImageFolder:
    """Unlabelled images (a folder of frames): same iteration protocol as a dataset, label None."""

    def __init__(self, folder: str | Path) -> None:
        self.image_dir = Path(folder)
        if not self.image_dir.is_dir():
            raise DatasetError(f"{self.image_dir}: no such folder")
        self.samples = [Sample(p.stem, p, None) for p in list_images(self.image_dir)]
        if not self.samples:
            raise DatasetError(f"{self.image_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        self.num_classes, self.ignore_index = None, None

    def __len__(self) -> int:
        return len(self.samples)

    def read_image(self, i: int) -> np.ndarray:
        return read_image(self.samples[i].image)

    def __getitem__(self, i: int) -> tuple[np.ndarray, None]:
        return self.read_image(i), None

    def __iter__(self) -> Iterator[tuple[np.ndarray, None]]:
        for i in range(len(self)):
            yield self[i]


Images = Union[SegmentationDataset, ImageFolder]


def open_images(root: str | Path, split: str | None = "val", num_classes: int = len(CAMVID_CLASSES),
                ignore_index: int = CAMVID_IGNORE) -> Images:
    """A labelled dataset where ``labels/`` exists, otherwise the plain image folder.

    Accepts ``root/split/{images,labels}``, ``root/{images,labels}``, ``root/split/images``,
    ``root/images`` or a folder of images itself, so `dilseg verify` runs on any of them.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder; pass a dataset root (images/ + labels/) or a folder of images")
    if is_cityscapes(root):
        data = CityscapesDataset(root, split)
        if num_classes != data.num_classes:
            raise DatasetError(f"class counts differ: the model has {num_classes} classes, {root} is Cityscapes "
                               f"with {data.num_classes} train ids")
        return data
    base = root / split if split and (root / split).is_dir() else root
    if (base / "labels").is_dir() and (base / "images").is_dir():
        own = dataset_classes(root) or (dataset_classes(base) if base != root else None)
        if own is not None:
            if len(own) != num_classes:
                raise DatasetError(f"class counts differ: the model has {num_classes} classes, {own.source} lists "
                                   f"{len(own)}")
            ignore_index = own.ignore_index if own.ignore_index is not None else DEFAULT_VOID
        data = SegmentationDataset(base, None, num_classes, ignore_index)
        data.classes = own
        return data
    if (base / "images").is_dir():
        return ImageFolder(base / "images")
    try:
        return ImageFolder(base)
    except DatasetError:
        hint = f" (looked in {base})" if base != root else ""
        raise DatasetError(
            f"{root}: no images found{hint}; expected images/ (+ labels/) or image files ({', '.join(IMAGE_SUFFIXES)})"
        ) from None
