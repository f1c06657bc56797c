"""Class presets and classes files (runtime/classes.py): the formats, the generated colours, and
each malformed file refused with the line or entry at fault."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dilseg.runtime.classes import PRESETS, ClassesError, distinct_colors, load_classes


def test_presets_carry_the_datasets_palettes() -> None:
    expect = {"camvid": (11, (128, 128, 128), (0, 128, 192), 11),
              "cityscapes": (19, (128, 64, 128), (119, 11, 32), 255),
              "ade20k": (150, (120, 120, 120), (92, 0, 255), 255),
              "voc": (21, (0, 0, 0), (0, 64, 128), 255)}
    for name, (count, first, last, void) in expect.items():
        c = load_classes(name.upper())  # preset names are case-insensitive
        assert (len(c), c.palette[0], c.palette[-1], c.ignore_index) == (count, first, last, void)
    assert PRESETS["cityscapes"].names[6] == "traffic light" and PRESETS["ade20k"].names[-1] == "flag"


def test_text_file_with_colours_spaces_comments_and_void(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("# ours\nroad 128 64 128\n\ntraffic light 250 170 30\nperson\nignore_index: 254\n")
    c = load_classes(path)
    assert c.names == ("road", "traffic light", "person") and c.ignore_index == 254
    assert c.palette[:2] == ((128, 64, 128), (250, 170, 30)) and c.palette[2] not in c.palette[:2]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_json_and_yaml_lists_and_mappings(tmp_path: Path, suffix: str) -> None:
    import yaml

    dump = json.dumps if suffix == ".json" else yaml.safe_dump
    entries = [{"name": "road", "color": [1, 2, 3]}, "sky", {"name": "car"}]
    (tmp_path / f"a{suffix}").write_text(dump(entries))
    (tmp_path / f"b{suffix}").write_text(dump({"classes": entries, "ignore_index": 255}))
    a, b = load_classes(tmp_path / f"a{suffix}"), load_classes(tmp_path / f"b{suffix}")
    assert a.names == b.names == ("road", "sky", "car") and a.palette == b.palette
    assert a.palette[0] == (1, 2, 3) and a.ignore_index is None and b.ignore_index == 255


def test_generated_colours_are_distinct_and_keep_away_from_given_ones() -> None:
    given = [(255, 0, 0), (0, 0, 0)]
    colours = distinct_colors(40, given)
    assert colours == distinct_colors(40, given)  # the same every time
    pts = np.array(colours + given, float)
    dist = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)) + np.eye(len(pts)) * 1e9
    assert dist.min() > 30
    assert len(set(distinct_colors(256))) == 256


BAD = {
    "range": ("road 300 0 0\n", "classes.txt:1: colour values must be within 0..255"),
    "two values": ("road 12 13\n", "classes.txt:1: 'road 12 13': a line is a class name, optionally followed by three"),
    "duplicate": ("Road\nsky\nroad\n", "classes.txt:3: duplicate class name 'road' (class 0 is 'Road')"),
    "empty": ("# nothing\n\n", "no classes in this file"),
    "void is a class": ("road\nsky\nignore_index: 1\n", "ignore_index 1 is the id of class 'sky'"),
    "void range": ("road\nignore_index: 300\n", "ignore_index must be an integer label value within 0..255"),
    "too many": ("".join(f"c{i}\n" for i in range(257)), "257 classes; label maps are 8-bit, so at most 256"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_text_files_name_the_line(tmp_path: Path, case: str) -> None:
    text, phrase = BAD[case]
    path = tmp_path / "classes.txt"
    path.write_text(text)
    with pytest.raises(ClassesError) as err:
        load_classes(path)
    assert phrase in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("data, phrase", [
    ({"names": ["a"]}, "a mapping needs a 'classes' list"),
    ([{"name": "a", "colour": [1, 2]}], "a colour is three integers R G B"),
    ([{"label": "a"}], "each class is {name, color}"),
    ([3], "expected a name or a {name, color} object"),
    ("road", "expected a list of classes"),
])
def test_malformed_json_names_the_entry(tmp_path: Path, data, phrase: str) -> None:
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ClassesError, match=phrase.replace("{", r"\{").replace("}", r"\}")):
        load_classes(path)


def test_unknown_preset_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ClassesError, match="neither a preset .camvid, cityscapes, ade20k, voc. nor an existing file"):
        load_classes("kitti")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ClassesError, match="cannot read this classes file"):
        load_classes(tmp_path / "bin.txt")
