"""Class lists: the presets of the public datasets, a user's classes file, and colours for classes
that come without one.

A classes file is one of:

- text: one class per line, ``name`` or ``name R G B`` (names may contain spaces); blank lines
  and lines starting with ``#`` are skipped; a line ``ignore_index: N`` gives the label value
  of unlabelled pixels in a dataset;
- JSON or YAML: a list of ``{"name": ..., "color": [R, G, B]}`` (or plain names), or a mapping
  ``{"classes": [...], "ignore_index": N}``.

Presets carry the palettes published with each dataset (CamVid's conventional colours,
Cityscapes' ``labels.py``, the ADE20K/SceneParse150 palette of its benchmark code as
mmsegmentation ships it, and PASCAL VOC's devkit colour map). Classes without a colour get
one from a generated palette that keeps away from the colours already in use.
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import DilsegError
from .metadata import ModelMeta

RGB = tuple[int, int, int]
MAX_CLASSES = 256  # label maps are 8-bit class ids


class ClassesError(DilsegError, ValueError):
    """A class list that cannot be used: unknown preset, unreadable, malformed or inconsistent file."""


@dataclass(frozen=True)
class ClassList:
    """Names, an RGB colour per name, and the label value that marks unlabelled pixels."""

    names: tuple[str, ...]
    palette: tuple[RGB, ...]
    ignore_index: int | None
    source: str  # the preset's name or the file it was read from

    def __len__(self) -> int:
        return len(self.names)

    def model_meta(self, model: str, input_size: tuple[int, int] | None = (360, 480), **fields) -> ModelMeta:
        """Metadata of ``model`` trained on these classes, with the preprocessing dilseg's own
        models are trained with (ModelMeta's defaults); ``fields`` set the rest (output_kind, ...)."""
        return ModelMeta(model=model, classes=self.names, palette=self.palette, input_size=input_size,
                         ignore_index=self.ignore_index, **fields)

    def check_count(self, count: int, what: str) -> None:
        """``what`` (e.g. "the graph's output") has ``count`` classes; so must this list."""
        if count != len(self.names):
            raise ClassesError(f"{what} has {count} classes but {self.source} lists {len(self.names)}; "
                               f"give a classes file with {count} names (one per line)")


# -- presets -------------------------------------------------------------------------------

CAMVID = (
    ("Sky", (128, 128, 128)), ("Building", (128, 0, 0)), ("Pole", (192, 192, 128)), ("Road", (128, 64, 128)),
    ("Sidewalk", (0, 0, 192)), ("Tree", (128, 128, 0)), ("SignSymbol", (192, 128, 128)), ("Fence", (64, 64, 128)),
    ("Car", (64, 0, 128)), ("Pedestrian", (64, 64, 0)), ("Bicyclist", (0, 128, 192)),
)
CAMVID_VOID = 11

# Cityscapes' 19 evaluation classes in train-id order (cityscapesScripts, helpers/labels.py).
CITYSCAPES = (
    ("road", (128, 64, 128)), ("sidewalk", (244, 35, 232)), ("building", (70, 70, 70)), ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)), ("pole", (153, 153, 153)), ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)), ("vegetation", (107, 142, 35)), ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)), ("person", (220, 20, 60)), ("rider", (255, 0, 0)), ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)), ("bus", (0, 60, 100)), ("train", (0, 80, 100)), ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
)
# Cityscapes label id (gtFine *_labelIds.png) -> train id; every id not listed is void (255).
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_VOID = 255

ADE20K_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step",
    "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
# SceneParse150's palette in class order (as its benchmark code and mmsegmentation publish it;
# "road" and "skyscraper" share one colour there, and keep it here).
ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255),
    (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245),
    (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0),
    (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82),
    (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0),
    (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112),
    (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0),
    (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0),
    (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

VOC = (
    ("background", (0, 0, 0)), ("aeroplane", (128, 0, 0)), ("bicycle", (0, 128, 0)), ("bird", (128, 128, 0)),
    ("boat", (0, 0, 128)), ("bottle", (128, 0, 128)), ("bus", (0, 128, 128)), ("car", (128, 128, 128)),
    ("cat", (64, 0, 0)), ("chair", (192, 0, 0)), ("cow", (64, 128, 0)), ("diningtable", (192, 128, 0)),
    ("dog", (64, 0, 128)), ("horse", (192, 0, 128)), ("motorbike", (64, 128, 128)), ("person", (192, 128, 128)),
    ("pottedplant", (0, 64, 0)), ("sheep", (128, 64, 0)), ("sofa", (0, 192, 0)), ("train", (128, 192, 0)),
    ("tvmonitor", (0, 64, 128)),
)


def _preset(name: str, pairs, ignore: int) -> ClassList:
    return ClassList(tuple(n for n, _ in pairs), tuple(c for _, c in pairs), ignore, name)


PRESETS: dict[str, ClassList] = {
    "camvid": _preset("camvid", CAMVID, CAMVID_VOID),
    "cityscapes": _preset("cityscapes", CITYSCAPES, CITYSCAPES_VOID),
    "ade20k": _preset("ade20k", tuple(zip(ADE20K_NAMES, ADE20K_PALETTE)), 255),
    "voc": _preset("voc", VOC, 255),
}


# -- generated colours ---------------------------------------------------------------------

def distinct_colors(count: int, taken: list[RGB] | tuple[RGB, ...] = ()) -> list[RGB]:
    """``count`` colours far from each other and from ``taken``, the same every time.

    Hues step by the golden angle through three saturation/value rings; a candidate too close
    (Euclidean RGB distance) to a colour in use is skipped, and the distance required shrinks
    only when no candidate is left, so small palettes are very distinct and large ones still work.
    """
    used = [tuple(int(v) for v in c) for c in taken]
    out: list[RGB] = []
    rings = ((0.75, 0.95), (0.95, 0.65), (0.45, 0.85), (0.9, 0.45))
    min_dist, step = 96.0, 0
    while len(out) < count:
        placed = False
        for _ in range(720):
            s, v = rings[step % len(rings)]
            h = (step * 0.618033988749895) % 1.0
            step += 1
            rgb = tuple(int(round(x * 255)) for x in colorsys.hsv_to_rgb(h, s, v))
            if all(sum((a - b) ** 2 for a, b in zip(rgb, u)) >= min_dist ** 2 for u in used):
                used.append(rgb)
                out.append(rgb)
                placed = True
                break
        if not placed:
            min_dist *= 0.75
    return out


# -- parsing -------------------------------------------------------------------------------

def load_classes(spec: str | Path) -> ClassList:
    """A preset name (camvid, cityscapes, ade20k, voc) or the path of a classes file."""
    key = str(spec).strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ClassesError(f"--classes {spec}: neither a preset ({', '.join(PRESETS)}) nor an existing file; "
                           "give a text file with one class name per line (optionally followed by R G B)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ClassesError(f"{path}: cannot read this classes file ({exc})") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClassesError(f"{path}: not valid JSON ({exc})") from None
        return _from_structure(data, path)
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ClassesError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write the classes "
                               "as JSON or text") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ClassesError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        return _from_structure(data, path)
    return _from_text(text, path)


def _color(value, where: str) -> RGB:
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ClassesError(f"{where}: a colour is three integers R G B, got {value!r}")
    if not all(0 <= v <= 255 for v in value):
        raise ClassesError(f"{where}: colour values must be within 0..255, got {list(value)}")
    return (int(value[0]), int(value[1]), int(value[2]))


def _ignore(value, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 255:
        raise ClassesError(f"{where}: ignore_index must be an integer label value within 0..255, got {value!r}")
    return int(value)


def _from_text(text: str, path: Path) -> ClassList:
    entries: list[tuple[str, RGB | None, str]] = []
    ignore = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        where = f"{path}:{number}"
        if not line or line.startswith("#"):
            continue
        if line.lower().startswith("ignore_index:"):
            value = line.split(":", 1)[1].strip()
            ignore = _ignore(int(value) if value.lstrip("-").isdigit() else value, where)
            continue
        tokens = line.split()
        trailing = 0
        while trailing < len(tokens) - 1 and tokens[-1 - trailing].lstrip("-").isdigit():
            trailing += 1
        if trailing == 0:
            entries.append((line, None, where))
        elif trailing == 3:
            entries.append((" ".join(tokens[:-3]), _color([int(t) for t in tokens[-3:]], where), where))
        else:
            raise ClassesError(f"{where}: {line!r}: a line is a class name, optionally followed by three colour "
                               "values R G B")
    return _finish(entries, ignore, path)


def _from_structure(data, path: Path) -> ClassList:
    ignore = None
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"classes", "ignore_index"})
        if "classes" not in data or unknown:
            raise ClassesError(f"{path}: a mapping needs a 'classes' list (and optionally 'ignore_index')"
                               + (f"; unknown keys: {', '.join(map(str, unknown))}" if unknown else ""))
        if data.get("ignore_index") is not None:
            ignore = _ignore(data["ignore_index"], str(path))
        data = data["classes"]
    if not isinstance(data, list):
        raise ClassesError(f"{path}: expected a list of classes ({{name, color}} objects or names), "
                           f"got {type(data).__name__}")
    entries = []
    for i, item in enumerate(data):
        where = f"{path}: class {i}"
        if isinstance(item, str):
            entries.append((item.strip(), None, where))
        elif isinstance(item, dict):
            unknown = sorted(set(item) - {"name", "color", "colour"})
            if "name" not in item or unknown:
                raise ClassesError(f"{where}: each class is {{name, color}}"
                                   + (f"; unknown keys: {', '.join(map(str, unknown))}" if unknown else ", name missing"))
            if not isinstance(item["name"], str):
                raise ClassesError(f"{where}: the name must be text, got {item['name']!r}")
            color = item.get("color", item.get("colour"))
            entries.append((item["name"].strip(), None if color is None else _color(color, where), where))
        else:
            raise ClassesError(f"{where}: expected a name or a {{name, color}} object, got {item!r}")
    return _finish(entries, ignore, path)


def _finish(entries: list[tuple[str, RGB | None, str]], ignore: int | None, path: Path) -> ClassList:
    if not entries:
        raise ClassesError(f"{path}: no classes in this file (one name per line, optionally followed by R G B)")
    if len(entries) > MAX_CLASSES:
        raise ClassesError(f"{path}: {len(entries)} classes; label maps are 8-bit, so at most {MAX_CLASSES}")
    seen: dict[str, tuple[int, str]] = {}
    for i, (name, _, where) in enumerate(entries):
        if not name:
            raise ClassesError(f"{where}: empty class name")
        key = name.casefold()
        if key in seen:
            raise ClassesError(f"{where}: duplicate class name {name!r} (class {seen[key][0]} is {seen[key][1]!r}); "
                               "names must be unique")
        seen[key] = (i, name)
    if ignore is not None and ignore < len(entries):
        raise ClassesError(f"{path}: ignore_index {ignore} is the id of class {entries[ignore][0]!r}; the void "
                           f"label must be outside 0..{len(entries) - 1} (e.g. 255)")
    given = [c for _, c, _ in entries if c is not None]
    fresh = iter(distinct_colors(sum(c is None for _, c, _ in entries), given))
    palette = tuple(c if c is not None else next(fresh) for _, c, _ in entries)
    return ClassList(tuple(n for n, _, _ in entries), palette, ignore, str(path))
