"""render() draws with cv2.applyColorMap, cv2.addWeighted and cv2.copyTo: the same pixels as the numpy
implementation it replaced (kept below as the reference), on real CamVid frames at 720x960
with the shipped model's labels and with ground-truth labels (which include void)."""

from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from dilseg.runtime.artifact import read_meta
from dilseg.runtime.dataset import SegmentationDataset
from dilseg.runtime.defaults import default_model_path
from dilseg.runtime.postprocess import class_areas, colorize, draw_legend, palette_bgr, postprocess, render
from dilseg.runtime.preprocess import preprocess

from precision_helpers import CAMVID, needs_camvid

pytestmark = needs_camvid
SIZE = (720, 960)


def reference_render(frame, labels, meta, view="overlay", alpha=0.5, visible=None, legend=False):
    """render() as it was before OpenCV drew it: numpy fancy indexing and a boolean-mask copy."""
    lut = palette_bgr(meta, visible)
    mask = lut[labels]
    if view == "mask":
        out = mask
    else:
        out = cv2.addWeighted(mask, alpha, frame, 1.0 - alpha, 0.0)
        if visible is not None:
            keep = ~np.isin(labels, visible)
            out[keep] = frame[keep]
        if view == "side-by-side":
            out = np.concatenate([frame, out], axis=1)
    if legend:
        out = draw_legend(out, meta, class_areas(labels, meta.num_classes), visible)
    return out


@pytest.fixture(scope="module")
def frames_and_labels():
    """Three val frames upscaled to 720x960: (frame, model labels, ground-truth labels)."""
    data = SegmentationDataset(CAMVID, "val")
    meta = read_meta(default_model_path())
    sess = ort.InferenceSession(str(default_model_path()), providers=["CPUExecutionProvider"])
    out = []
    for i in (0, len(data) // 2, len(data) - 1):
        image, truth = data[i]
        frame = cv2.resize(image, SIZE[::-1], interpolation=cv2.INTER_LINEAR)
        labels = postprocess(sess.run(None, {"input": preprocess(frame, meta)})[0], meta, frame.shape)
        truth = cv2.resize(truth, SIZE[::-1], interpolation=cv2.INTER_NEAREST)
        out.append((frame, labels, truth))
    return out


@pytest.mark.parametrize("view", ["overlay", "mask", "side-by-side"])
@pytest.mark.parametrize("alpha, visible, legend", [(0.5, None, False), (0.6, [0, 3, 8], True), (0.0, [2], False),
                                                    (1.0, None, True), (0.35, [], False)])
def test_render_matches_the_numpy_reference(frames_and_labels, view, alpha, visible, legend) -> None:
    meta = read_meta(default_model_path())
    for frame, labels, truth in frames_and_labels:
        assert labels.dtype == np.uint8 and labels.shape == SIZE and len(np.unique(labels)) >= 4
        for lab in (labels, truth):
            want = reference_render(frame, lab, meta, view, alpha, visible, legend)
            got = render(frame, lab, meta, view, alpha, visible, legend)
            assert got.dtype == np.uint8 and got.shape == want.shape
            assert np.array_equal(got, want), f"{view} alpha={alpha} visible={visible}: pixels differ"


def test_colorize_of_other_label_dtypes_and_ids_past_the_palette(frames_and_labels) -> None:
    meta = read_meta(default_model_path())
    lut = palette_bgr(meta)
    _, labels, truth = frames_and_labels[0]
    assert 11 in truth  # void: past the 11-colour palette, drawn black
    assert np.array_equal(colorize(truth, lut), lut[truth])
    assert not colorize(truth, lut)[truth == 11].any()
    wide = labels.astype(np.int32)
    assert np.array_equal(colorize(wide, lut), lut[labels])


def test_render_leaves_its_inputs_untouched(frames_and_labels) -> None:
    meta = read_meta(default_model_path())
    frame, labels, _ = frames_and_labels[1]
    before_f, before_l = frame.copy(), labels.copy()
    render(frame, labels, meta, "overlay", 0.5, [1, 2])
    assert np.array_equal(frame, before_f) and np.array_equal(labels, before_l)
