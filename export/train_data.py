"""What the trainer feeds the model: the sequence-held-out split, and augmented crops built
in DataLoader worker processes.

Each training sample is addressed by ``(epoch, position, image, thin_class)``; the
``EpochSampler`` draws the image order (and the thin-class picks) in the main process and
the ``CropDataset`` seeds a fresh generator from ``(seed, epoch, position)``. So a run is
the same bit for bit with 0 or 16 workers, and a resumed run continues the same sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from dilseg.runtime.dataset import DatasetError, SegmentationDataset, open_dataset
from dilseg.runtime.metadata import ModelMeta
from dilseg.runtime.preprocess import normalize

from .augment import Photometric, geometric, photometric

Pair = tuple[np.ndarray, np.ndarray]  # BGR uint8 image, uint8 label map


@dataclass
class Split:
    """Frames to train on and the two evaluation sets.

    ``holdout``: the held-out sequence's frames from every split (empty without a holdout);
    ``val``: the classic val split, reported for comparison (empty when it is trained on).
    Selection uses ``holdout`` whenever there is one, never frames between training frames.
    """

    train: list[SegmentationDataset]
    holdout: list[SegmentationDataset] = field(default_factory=list)
    val: list[SegmentationDataset] = field(default_factory=list)

    def train_stems(self) -> list[str]:
        return [s.stem for d in self.train for s in d.samples]


def make_split(root: str, holdout: str = "", train_splits: tuple[str, ...] = ("train",),
               val_split: str = "val") -> Split:
    """Split a dataset root for training.

    Without ``holdout``: train on ``train_splits``, validate on ``val_split`` (unless it is
    trained on). With ``holdout`` (a sequence name such as ``0006R0``): train on the frames
    of the other sequences in ``train_splits``, evaluate the held-out sequence's frames
    from the train and val splits together, and report ``val_split`` minus the held-out
    sequence beside it.
    """
    names = dict.fromkeys([*train_splits, val_split])
    sets = {name: open_dataset(root, name) for name in names}
    if not holdout:
        val = [] if val_split in train_splits else [sets[val_split]]
        return Split([sets[n] for n in train_splits], [], val)
    present = sorted({q for d in sets.values() for q in d.sequences()})
    if holdout not in present:
        raise DatasetError(f"{root}: no sequence {holdout!r} to hold out; the sequences are {', '.join(present)} "
                           "(frame names <sequence>_<frame>)")
    held = frozenset({holdout})
    train = [sets[n].select(held, keep=False) for n in train_splits]
    if not any(len(d) for d in train):
        raise DatasetError(f"{root}: holding out {holdout} leaves nothing to train on")
    holdout_sets = [d.select(held) for d in sets.values()]
    val = [] if val_split in train_splits else [sets[val_split]]
    return Split([d for d in train if len(d)], [d for d in holdout_sets if len(d)], val)


def load_pairs(sets: list[SegmentationDataset], limit: int = 0) -> list[Pair]:
    """Decode every (image, label) once: JPEG decoding each epoch costs as much as a small
    model's forward pass on a CPU."""
    keys = [(d, i) for d in sets for i in range(len(d))]
    return [d[i] for d, i in (keys[:limit] if limit else keys)]


def thin_pixels(labels: list[np.ndarray], classes: tuple[int, ...], per_image: int = 512,
                seed: int = 0) -> dict[int, list[tuple[int, np.ndarray]]]:
    """For each class, the images holding it and up to ``per_image`` of its pixel coordinates."""
    rng = np.random.default_rng(seed)
    found: dict[int, list[tuple[int, np.ndarray]]] = {c: [] for c in classes}
    for i, lab in enumerate(labels):
        for c in classes:
            ys, xs = np.nonzero(lab == c)
            if len(ys):
                keep = rng.choice(len(ys), min(per_image, len(ys)), replace=False)
                found[c].append((i, np.stack([ys[keep], xs[keep]], 1).astype(np.int32)))
    return {c: v for c, v in found.items() if v}


class EpochSampler(Sampler):
    """A permutation of the images per epoch; with ``thin_p`` > 0 each position is, with that
    chance, replaced by an image holding a thin class (class chosen uniformly), whose crop
    is then centred on that class (rare-class sampling, as in DAFormer)."""

    def __init__(self, n: int, seed: int, thin: dict[int, list] | None = None, thin_p: float = 0.0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0
        self.thin = {c: [i for i, _ in v] for c, v in (thin or {}).items()}
        self.thin_p = thin_p if self.thin else 0.0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch, 7])
        order = rng.permutation(self.n)
        classes = sorted(self.thin)
        for pos, img in enumerate(order.tolist()):
            cls = -1
            if self.thin_p and rng.random() < self.thin_p:
                cls = classes[int(rng.integers(len(classes)))]
                img = self.thin[cls][int(rng.integers(len(self.thin[cls])))]
            yield (self.epoch, pos, img, cls)


class CropDataset(Dataset):
    """Augmented, normalised training crops; indexed by the sampler's tuples."""

    def __init__(self, pairs: list[Pair], meta: ModelMeta, crop: tuple[int, int], scale: tuple[float, float],
                 ignore: int, seed: int, photo: Photometric | None = None,
                 thin: dict[int, list[tuple[int, np.ndarray]]] | None = None) -> None:
        self.pairs, self.meta, self.crop, self.scale = pairs, meta, crop, scale
        self.ignore, self.seed, self.photo = ignore, seed, photo
        self.thin = {c: dict(v) for c, v in (thin or {}).items()}

    def __len__(self) -> int:
        return len(self.pairs)

    def sample(self, key: tuple[int, int, int, int]) -> Pair:
        """The augmented uint8 (image, label) for a sampler key."""
        epoch, pos, img, cls = key
        rng = np.random.default_rng([self.seed, epoch, pos, 1])
        image, label = self.pairs[img]
        centre = None
        if cls >= 0:
            coords = self.thin[cls][img]
            centre = tuple(coords[int(rng.integers(len(coords)))].tolist())
        image, label = geometric(image, label, self.crop, self.scale, self.ignore, rng, centre=centre)
        if self.photo is not None:
            image = photometric(image, self.photo, rng)
        return image, label

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.sample(key)
        return torch.from_numpy(normalize(image, self.meta)[0]), torch.from_numpy(label.astype(np.int64))


def worker_init(_: int) -> None:
    """One OpenCV thread per worker: the workers are the parallelism. (Workers are spawned,
    not forked: a fork of a process whose OpenCV thread pool is running hangs in the child.)"""
    import cv2

    cv2.setNumThreads(1)
