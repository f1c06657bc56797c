"""fp16 and int8 ONNX variants: graph structure per flavour, fp16 overflow guard, calibration
input handling, metadata, and the CLI's errors."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from dilseg.export.onnx_export import ExportError
from dilseg.export.quantize import (FP16_MAX, ImageReader, QuantizeError, calibration_images, convert_fp16,
                                    export_variant)
from dilseg.export.torch_backend import weights_meta
from dilseg.export.weights import load_model
from dilseg.runtime.artifact import read_meta
from dilseg.runtime.cli import main
from dilseg.runtime.dataset import SegmentationDataset
from dilseg.runtime.preprocess import preprocess
from precision_helpers import CAMVID, SIZE, needs_camvid, tiny_onnx, tiny_weights, write_pair

pytestmark = needs_camvid


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def qdq_nodes(model: onnx.ModelProto, op: str, weights: bool) -> list[tuple[onnx.NodeProto, np.ndarray, np.ndarray]]:
    """(node, scale, zero point) of QuantizeLinear/DequantizeLinear nodes on weights or on activations."""
    values = constants(model)
    inits = {t.name for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type == op and (node.input[0] in inits) == weights:
            found.append((node, values[node.input[1]], values[node.input[2]]))
    return found


def weight_dqs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, np.ndarray, np.ndarray, int]]:
    """DequantizeLinear nodes feeding a Conv's weight input, with the Conv's output channels."""
    values = constants(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    out = []
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        dq = producers[conv.input[1]]
        assert dq.op_type == "DequantizeLinear", f"{conv.name}: weight is not dequantized"
        w = producers.get(dq.input[0])
        weight = values[w.input[0]] if w is not None else values[dq.input[0]]  # Q/DQ pair or int8 weights
        out.append((dq, values[dq.input[1]], values[dq.input[2]], weight.shape[0]))
    return out


def test_tensorrt_flavour_is_symmetric_int8_only(tmp_path_factory) -> None:
    path = tiny_onnx(tmp_path_factory, "int8", "tensorrt")
    model = onnx.load(str(path))
    activations = qdq_nodes(model, "QuantizeLinear", weights=False)
    assert len(activations) >= 20  # every conv input, residual add and the upsampling
    for node, scale, zero in activations:
        assert zero.dtype == np.int8 and not zero.any(), f"{node.name}: zero point {zero} ({zero.dtype})"
        assert scale.size == 1 and scale > 0
    for dq, scale, zero, channels in weight_dqs(model):
        # Per-channel symmetric int8: one scale per output channel, all zero points 0.
        assert zero.dtype == np.int8 and not zero.any() and scale.shape == (channels,), dq.name
    # TensorRT parses DequantizeLinear only on 8-bit inputs: no int32 biases anywhere.
    values = constants(model)
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in values:
            assert values[node.input[0]].dtype in (np.int8, np.float32), node.name
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}  # nothing TensorRT does not know
    meta = read_meta(path)
    assert meta.precision == "int8" and meta.extra["int8_target"] == "tensorrt"
    assert meta.extra["calibration"]["method"] == "entropy" and meta.extra["calibration"]["images"] == 16


def test_cpu_flavour_has_uint8_activations_with_zero_points(tmp_path_factory) -> None:
    path = tiny_onnx(tmp_path_factory, "int8", "cpu")
    model = onnx.load(str(path))
    activations = qdq_nodes(model, "QuantizeLinear", weights=False)
    assert activations and all(zero.dtype == np.uint8 for _, _, zero in activations)
    # Asymmetric: signed inputs (the normalised image, pre-activation sums) get non-zero zero points.
    assert any(int(zero) not in (0, 128) for _, _, zero in activations)
    for dq, scale, zero, channels in weight_dqs(model):
        assert zero.dtype == np.int8 and scale.shape == (channels,), dq.name
    meta = read_meta(path)
    assert meta.precision == "int8" and meta.extra["int8_target"] == "cpu"
    assert "uint8" in meta.extra["calibration"]["activations"]
    assert "7 bits" in meta.extra["calibration"]["weights"]


def int8_weight_peak(path) -> int:
    """The largest |quantised weight|: int8 initialisers (cpu flavour), or float weights over
    their QuantizeLinear scales (tensorrt flavour's Q/DQ pairs)."""
    model = onnx.load(str(path))
    stored = [int(np.abs(v.astype(np.int16)).max()) for v in constants(model).values() if v.dtype == np.int8 and v.size > 1]
    values = constants(model)
    paired = [int(np.rint(np.abs(values[q.input[0]]) / scale.reshape(-1, *[1] * (values[q.input[0]].ndim - 1))).max())
              for q, scale, _ in qdq_nodes(model, "QuantizeLinear", weights=True)]
    return max(stored + paired)


def test_cpu_flavour_weights_fit_in_7_bits_and_tensorrt_keeps_8(tmp_path_factory) -> None:
    """7-bit weights (|w| <= 64) keep the int16 pair sums of CPUs without VNNI from saturating
    (2 x 255 x 64 < 32767); TensorRT's flavour keeps the full int8 range."""
    assert 32 < int8_weight_peak(tiny_onnx(tmp_path_factory, "int8", "cpu")) <= 64
    assert 64 < int8_weight_peak(tiny_onnx(tmp_path_factory, "int8", "tensorrt")) <= 127


def test_int8_and_fp16_keep_the_runtime_boundary(tmp_path_factory) -> None:
    """fp32 image in, int32 labels out, whatever the inside: the runtime needs no special case."""
    data = SegmentationDataset(CAMVID, "val")
    for precision, target in (("fp16", "tensorrt"), ("int8", "tensorrt"), ("int8", "cpu")):
        path = tiny_onnx(tmp_path_factory, precision, target)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert sess.get_inputs()[0].type == "tensor(float)"
        assert [o.type for o in sess.get_outputs()] == ["tensor(int32)"]
        labels = sess.run(None, {"input": preprocess(data.read_image(0), read_meta(path))})[0]
        assert labels.shape == (1, *SIZE) and labels.min() >= 0 and labels.max() <= 10


def test_label_nodes_after_the_argmax_stay_unquantised(tmp_path_factory) -> None:
    """The reduced head moves class ids through a float nearest Resize; a Q/DQ pair there would
    round them to the quantisation grid, i.e. to other classes."""
    data = SegmentationDataset(CAMVID, "val")
    for target in ("tensorrt", "cpu"):
        path = tiny_onnx(tmp_path_factory, "int8", target)
        model = onnx.load(str(path))
        assert read_meta(path).extra["head"] == "half"
        consumers = {}
        for node in model.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        after, todo = [], [o for n in model.graph.node if n.op_type == "ArgMax" for o in n.output]
        while todo:
            for node in consumers.get(todo.pop(), []):
                after.append(node.op_type)
                todo.extend(node.output)
        assert "Resize" in after and not {"QuantizeLinear", "DequantizeLinear"} & set(after), after
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        labels = sess.run(None, {"input": preprocess(data.read_image(3), read_meta(path))})[0]
        # Every 2x2 block holds one label, as the head repeats it.
        assert np.array_equal(labels, labels[:, ::2, ::2].repeat(2, 1).repeat(2, 2)) and len(np.unique(labels)) >= 2


def test_fp16_graph_computes_in_fp16(tmp_path_factory) -> None:
    path = tiny_onnx(tmp_path_factory, "fp16")
    model = onnx.load(str(path))
    values = constants(model)
    conv_weights = [values[n.input[1]] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in values]
    assert conv_weights and all(w.dtype == np.float16 for w in conv_weights)
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    to = [next(a.i for a in n.attribute if a.name == "to") for n in casts]
    assert TensorProto.FLOAT16 in to and TensorProto.INT32 in to  # fp32 -> fp16 at the input, labels at the end
    meta = read_meta(path)
    assert meta.precision == "fp16" and meta.extra["fp16_kept_fp32"] == []
    assert 0 < meta.extra["max_activation"] < FP16_MAX / 4


def test_fp16_keeps_overflowing_ops_in_fp32(tmp_path_factory) -> None:
    """Scale the first conv up by 1e5 and the next one down by as much: through the ReLU between
    them the function is unchanged, but the activations in between exceed fp16's 65504."""
    fp32 = onnx.load(str(tiny_onnx(tmp_path_factory)))
    meta = read_meta(tiny_onnx(tmp_path_factory))
    convs = [n for n in fp32.graph.node if n.op_type == "Conv"]
    inits = {t.name: t for t in fp32.graph.initializer}
    k = 1e5
    for name, factor in ((convs[0].input[1], k), (convs[0].input[2], k), (convs[1].input[1], 1 / k)):
        inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]) * np.float32(factor), name))
    calib = calibration_images(CAMVID / "train", 6)
    frames = [preprocess(SegmentationDataset(CAMVID, "val").read_image(i), meta) for i in range(4)]

    def labels(model: onnx.ModelProto) -> list[np.ndarray]:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return [sess.run(None, {"input": x})[0] for x in frames]

    reference = labels(fp32)
    guarded, info = convert_fp16(fp32, meta, ImageReader(calib, meta, "input"))
    assert {convs[0].name, convs[1].name} <= set(info["fp16_kept_fp32"])
    assert info["max_activation"] > FP16_MAX
    onnx.checker.check_model(guarded, full_check=True)
    agreement = np.mean([(a == b).mean() for a, b in zip(reference, labels(guarded))])
    assert agreement > 0.995
    # Without the guard the same conversion overflows to inf and the labels are garbage.
    from onnxruntime.transformers.float16 import convert_float_to_float16

    naive = convert_float_to_float16(fp32, keep_io_types=True)
    from dilseg.export.quantize import topological_sort

    topological_sort(naive)
    # (ONNX Runtime's CPU kernels compute fp16 ops in fp32, so only the clamped weights show here;
    # a GPU running true fp16 arithmetic turns the overflow into inf/NaN everywhere downstream.)
    assert np.mean([(a == b).mean() for a, b in zip(reference, labels(naive))]) < 0.98


def test_calibration_methods_give_different_ranges(tmp_path_factory) -> None:
    def first_activation_scales(method: str) -> np.ndarray:
        model = onnx.load(str(tiny_onnx(tmp_path_factory, "int8", "tensorrt", method)))
        assert read_meta(tiny_onnx(tmp_path_factory, "int8", "tensorrt", method)).extra["calibration"]["method"] == method
        return np.array([float(s) for _, s, _ in qdq_nodes(model, "QuantizeLinear", weights=False)])

    entropy, minmax, percentile = (first_activation_scales(m) for m in ("entropy", "minmax", "percentile"))
    assert entropy.shape == minmax.shape == percentile.shape
    # MinMax covers every calibration value, so its ranges are the widest.
    assert (minmax >= entropy * 0.999).all() and (minmax >= percentile * 0.999).all()
    assert not np.allclose(entropy, minmax)


def test_calibration_images_are_spread_and_folders_resolved(tmp_path) -> None:
    for i in range(10):
        write_pair(tmp_path / "ds" / "train", f"f{i:02d}", np.full((8, 16, 3), i, np.uint8), None)
    picks = calibration_images(tmp_path / "ds", 3)  # dataset root -> train/images
    assert [p.stem for p in picks] == ["f00", "f05", "f09"] or [p.stem for p in picks] == ["f00", "f04", "f09"]
    assert len(calibration_images(tmp_path / "ds" / "train", 50)) == 10  # all there are
    assert len(calibration_images(tmp_path / "ds" / "train" / "images", 2)) == 2
    with pytest.raises(QuantizeError, match="no such folder"):
        calibration_images(tmp_path / "missing", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuantizeError, match="no images"):
        calibration_images(tmp_path / "empty", 4)
    with pytest.raises(QuantizeError, match="--calib-images must be >= 1"):
        calibration_images(tmp_path / "ds", 0)
    with pytest.raises(QuantizeError, match="need --calib-dir"):
        calibration_images(None, 4)


def test_unreadable_calibration_image_is_named(tmp_path_factory, tmp_path) -> None:
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "bad.jpg").write_bytes(b"not an image")
    weights = tiny_weights(tmp_path_factory)
    model, _ = load_model(weights)
    with pytest.raises(QuantizeError, match=r"bad\.jpg: cannot be read"):
        export_variant(model, weights_meta(weights, SIZE), tmp_path / "x.onnx", SIZE, "int8", tmp_path / "calib", 4)
    assert not (tmp_path / "x.onnx").exists()


def test_variant_below_the_agreement_floor_is_not_written(tmp_path_factory, tmp_path) -> None:
    weights = tiny_weights(tmp_path_factory)
    model, _ = load_model(weights)
    out = tmp_path / "int8.onnx"
    with pytest.raises(ExportError, match="disagrees with PyTorch: argmax agreement .* nothing was written"):
        export_variant(model, weights_meta(weights, SIZE), out, SIZE, "int8", CAMVID / "train", 4, "cpu",
                       min_agreement=100.0001)
    assert not out.exists() and not list(tmp_path.glob(".int8.onnx*"))


def test_cli_exports_int8_and_explains_bad_input(tmp_path_factory, tmp_path, capsys) -> None:
    weights = str(tiny_weights(tmp_path_factory))
    out = tmp_path / "cpu.onnx"
    assert main(["export", "onnx", "--weights", weights, "--size", "64x96", "--precision", "int8", "--target", "cpu",
                 "--calib-dir", str(CAMVID / "train"), "--calib-images", "8", "--calib-method", "minmax",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "int8 (cpu flavour, minmax calibration on 8 images)" in printed and "argmax agreement" in printed
    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["dilseg"])
    assert meta["precision"] == "int8" and meta["extra"]["int8_target"] == "cpu"
    assert meta["extra"]["calibration"] == {"method": "minmax", "images": 8, "activations": "uint8 asymmetric",
                                            "weights": "int8 per-channel symmetric, 7 bits (-64..64)"}
    assert meta["classes"][3] == "Road" and meta["input_size"] == [64, 96]

    def fails(*args: str) -> str:
        assert main(["export", "onnx", "--weights", weights, "--size", "64x96", *args,
                     "-o", str(tmp_path / "x.onnx")]) == 2
        assert not (tmp_path / "x.onnx").exists()
        return capsys.readouterr().err

    assert "--calib-dir" in (err := fails("--precision", "int8", "--calib-dir", str(tmp_path / "nope"))) \
        and "no such folder" in err
    (tmp_path / "empty").mkdir()
    assert "no images" in fails("--precision", "int8", "--calib-dir", str(tmp_path / "empty"))
    assert "need --calib-dir" in fails("--precision", "fp16")
    assert "needs no calibration" in fails("--calib-dir", str(CAMVID))


def test_int8_dynamic_model_calibrates_at_frame_size(tmp_path_factory, tmp_path) -> None:
    weights = tiny_weights(tmp_path_factory)
    model, _ = load_model(weights)
    frames = tmp_path / "small"
    data = SegmentationDataset(CAMVID, "train")
    import cv2

    for i in range(4):  # small frames keep this quick; a dynamic model takes them at their size
        write_pair(frames, f"s{i}", cv2.resize(data.read_image(i * 50), (96, 72)), None)
    out = tmp_path / "dyn.onnx"
    export_variant(model, weights_meta(weights, None), out, None, "int8", frames / "images", 4, "tensorrt",
                   min_agreement=80)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(1, 3, 48, 80)).astype(np.float32)
    assert sess.run(None, {"input": x})[0].shape == (1, 48, 80)
    assert Counter(n.op_type for n in onnx.load(str(out)).graph.node)["QuantizeLinear"] > 10


@pytest.mark.slow
def test_measure_precisions_script_prints_the_model_card_table(tmp_path_factory, tmp_path) -> None:
    """scripts/measure_precisions.py, on the tiny model with few images and runs: every variant measured."""
    import subprocess
    import sys

    from precision_helpers import REPO

    out = tmp_path / "m.json"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "measure_precisions.py"), str(tiny_onnx(tmp_path_factory)),
                        "--weights", str(tiny_weights(tmp_path_factory)), "--data", str(CAMVID), "--limit", "3",
                        "--calib-images", "4", "--runs", "3", "--warmup", "1", "--json", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["fp32", "fp16", "int8 tensorrt", "int8 cpu"]
    d = json.loads(out.read_text())
    assert d["accuracy"]["fp32"]["agreement"] == 100.0 and d["accuracy"]["fp16"]["agreement"] > 99
    assert all(ms > 0 for ms in d["latency_ms"].values()) and d["input_size"] == list(SIZE)
    assert "fp16 loses <= 0.1 points" in r.stdout
    # A weights file the ONNX was not exported from is refused before anything is built.
    from dilseg.export.weights import save_weights

    other = tmp_path / "other.safetensors"
    model, _ = load_model(tiny_weights(tmp_path_factory))
    save_weights(model, other, "edge_s", read_meta(tiny_onnx(tmp_path_factory)).classes, note="different header")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "measure_precisions.py"), str(tiny_onnx(tmp_path_factory)),
                        "--weights", str(other), "--data", str(CAMVID)], capture_output=True, text=True)
    assert r.returncode != 0 and "not the file" in r.stderr
