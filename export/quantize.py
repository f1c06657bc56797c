"""FP16 and INT8 (explicit QDQ) variants of a verified fp32 ONNX graph.

On TensorRT 11 precision is decided in the graph, so the variants are ONNX files:
- fp16: fp16 weights and arithmetic inside, fp32 input and int32 labels at the boundary.
  Ops whose activations come near fp16's range (65504) on calibration images stay fp32.
- int8: QuantizeLinear/DequantizeLinear pairs from ONNX Runtime's static quantizer,
  calibrated on real images fed through the model's own preprocessing, in two flavours:
  ``tensorrt`` (symmetric int8 activations, zero point 0, per-channel symmetric int8
  weights, float biases: the only form TensorRT parses) and ``cpu`` (asymmetric uint8
  activations, per-channel int8 weights in 7 bits, -64..64: the form ONNX Runtime's and
  OpenVINO's x86 kernels run fast).

Why 7 bits for ``cpu``: x86 CPUs without VNNI (AVX2 only) multiply uint8 by int8 with
``vpmaddubsw``, which adds two products into a saturating int16. With 8-bit weights two
products reach 2 x 255 x 127 = 64770 > 32767 and are clipped; with 7 bits they stay below
2 x 255 x 64 = 32640, so every x86 CPU computes the same exact result. Measured on an AVX2-only
CPU with the shipped model: OpenVINO int8 lost 10 points of val mIoU with 8-bit weights and
none with 7; VNNI CPUs gain nothing from the eighth bit on that model (see its card).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from dilseg.runtime.dataset import DatasetError, list_images, read_image
from dilseg.runtime.errors import DilsegError
from dilseg.runtime.metadata import ModelMeta
from dilseg.runtime.preprocess import preprocess

PRECISIONS = ("fp32", "fp16", "int8")
TARGETS = ("tensorrt", "cpu")
CALIB_METHODS = ("entropy", "percentile", "minmax")
FP16_MAX = 65504.0
# A calibration set is finite: an unseen, brighter or busier frame can push activations
# further, so an op is kept in fp32 once calibration sees it within 4x of fp16's maximum.
FP16_HEADROOM = 4.0
# Default argmax agreement with PyTorch that an export must reach before it is written.
# Logit tolerances do not apply below fp32: fp16 rounds every weight (|error| ~ 1e-3 of the
# logit scale), int8 moves logits by up to a quantisation step, so only the decision is compared.
MIN_AGREEMENT = {"fp32": 99.9, "fp16": 99.0, "int8": 90.0}


class QuantizeError(DilsegError, ValueError):
    """A precision variant cannot be made from these inputs; the message says what to change."""


def calibration_images(calib_dir: str | Path | None, count: int) -> list[Path]:
    """Up to ``count`` images spread evenly over a folder (frames of a video sequence sit next to
    each other, so the first N would all show the same street).

    ``calib_dir`` may be an image folder, a dataset split with images/, a dataset root
    with train/images (calibrate on training images, keep val for measuring), or a
    Cityscapes root (leftImg8bit/train/CITY/*.png).
    """
    if calib_dir is None:
        raise QuantizeError("fp16 and int8 exports need --calib-dir DIR: real images (e.g. ../shared/data/camvid/train) "
                            "to calibrate int8 ranges and check fp16 activation ranges on")
    if count < 1:
        raise QuantizeError(f"--calib-images must be >= 1, got {count}")
    root = Path(calib_dir)
    if not root.is_dir():
        raise QuantizeError(f"--calib-dir {root}: no such folder")
    cityscapes = root / "leftImg8bit" / "train"
    for folder in (root, root / "images", root / "train" / "images", cityscapes):
        if folder.is_dir():
            images = [p for city in sorted(folder.iterdir()) if city.is_dir() for p in list_images(city)] \
                if folder == cityscapes else list_images(folder)
            if images:
                break
    else:
        raise QuantizeError(f"--calib-dir {root}: no images (.jpg, .png, ...) in it, in images/, in train/images/ "
                            "or in leftImg8bit/train/ (Cityscapes)")
    picks = np.unique(np.linspace(0, len(images) - 1, min(count, len(images))).round().astype(int))
    return [images[i] for i in picks]


class ImageReader:
    """ONNX Runtime CalibrationDataReader over image files, preprocessed exactly as at run time.

    Reads lazily (a few hundred 360x480 tensors would not fit in memory at once) and supports
    set_range so the calibrator can collect statistics chunk by chunk.
    """

    def __init__(self, paths: list[Path], meta: ModelMeta, input_name: str, desc: str = "calibrating") -> None:
        self.paths, self.meta, self.input_name = paths, meta, input_name
        self.start, self.end = 0, len(paths)
        self.bar = tqdm(total=len(paths), desc=desc, unit="img", leave=False)

    def tensor(self, path: Path) -> np.ndarray:
        try:
            return preprocess(read_image(path), self.meta)
        except DatasetError as exc:
            raise QuantizeError(f"calibration image {exc}") from None

    def get_next(self) -> dict | None:
        if self.start >= self.end:
            return None
        x = self.tensor(self.paths[self.start])
        self.start += 1
        self.bar.update(1)
        return {self.input_name: x}

    def __len__(self) -> int:
        return len(self.paths)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, len(self.paths))

    def rewind(self) -> None:
        self.start, self.end = 0, len(self.paths)

    def close(self) -> None:
        self.bar.close()


def name_nodes(proto: onnx.ModelProto) -> None:
    """Block lists and exclusions address nodes by name; give unnamed nodes one."""
    seen = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def activation_ranges(proto: onnx.ModelProto, reader: ImageReader) -> dict[str, float]:
    """Largest |value| of every float tensor a node produces, over the calibration images."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    inferred = onnx.shape_inference.infer_shapes(probe)
    graph_outputs = {o.name for o in probe.graph.output}
    for vi in inferred.graph.value_info:
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and vi.name not in graph_outputs:
            probe.graph.output.append(vi)
    so = ort.SessionOptions()
    # Optimisations would fuse nodes away and hide the tensors being measured.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    peak: dict[str, float] = {}
    reader.rewind()
    while (feed := reader.get_next()) is not None:
        for name, value in [*zip(names, sess.run(None, feed)), *feed.items()]:
            if value.dtype == np.float32 and value.size:
                peak[name] = max(peak.get(name, 0.0), float(np.abs(value).max()))
    return peak


def convert_fp16(proto: onnx.ModelProto, meta: ModelMeta, reader: ImageReader) -> tuple[onnx.ModelProto, dict]:
    """fp16 inside, fp32 input and the original (int32 labels / fp32 logits) outputs outside."""
    # ONNX Runtime ships the converter onnxconverter-common maintains; no extra dependency.
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    name_nodes(proto)
    peaks = activation_ranges(proto, reader)
    limit = FP16_MAX / FP16_HEADROOM
    weights = {t.name: t for t in proto.graph.initializer}
    blocked = []
    for node in proto.graph.node:
        # An op overflows if it produces a huge tensor, and also if it consumes one: the cast
        # to fp16 at its input would already turn the values into inf.
        seen = [peaks.get(t, 0.0) for t in (*node.input, *node.output)]
        big_weight = any(
            n in weights and weights[n].data_type == onnx.TensorProto.FLOAT
            and float(np.abs(onnx.numpy_helper.to_array(weights[n])).max(initial=0.0)) > FP16_MAX
            for n in node.input
        )
        if big_weight or max(seen, default=0.0) > limit:
            blocked.append(node.name)
    converted = convert_float_to_float16(proto, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST),
                                         node_block_list=blocked)
    # (The converter renames blocked nodes' outputs, so look them up in the converted graph.)
    fp32 = {o for n in converted.graph.node if n.name in set(blocked) for o in n.output}
    fp32 |= {i.name for i in converted.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    drop_fp16_round_trips(converted, fp32)
    topological_sort(converted)
    info = {
        "fp16_kept_fp32": blocked,
        "max_activation": round(max(peaks.values(), default=0.0), 3),
        "calibration": {"images": len(reader), "headroom": FP16_HEADROOM},
    }
    return converted, info


def drop_fp16_round_trips(proto: onnx.ModelProto, fp32_tensors: set[str]) -> int:
    """The converter treats every blocked node as an island: a chain of blocked nodes still
    passes its values through fp16 between them (Cast to fp16, Cast back), which overflows
    exactly where blocking was meant to help. Feed such consumers the fp32 tensor directly.

    Only round trips that start from a known fp32 tensor (a blocked node's output or a float
    graph input) are removed. Returns how many were."""
    nodes = list(proto.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    graph_outputs = {o.name for o in proto.graph.output}

    def cast_to(node: onnx.NodeProto) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    rename, dropped = {}, set()
    for node in nodes:
        src = producer.get(node.input[0]) if node.input else None
        if (cast_to(node) == onnx.TensorProto.FLOAT and src is not None and cast_to(src) == onnx.TensorProto.FLOAT16
                and src.input[0] in fp32_tensors and node.output[0] not in graph_outputs):
            rename[node.output[0]] = src.input[0]
            dropped.add(id(node))
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {i for n in nodes if id(n) not in dropped for i in n.input} | graph_outputs
    keep = [n for n in nodes if id(n) not in dropped and not (cast_to(n) == onnx.TensorProto.FLOAT16
                                                             and n.output[0] not in used)]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    return len(dropped)


def topological_sort(proto: onnx.ModelProto) -> None:
    """The fp16 converter appends its boundary Casts at the end of the node list; ONNX wants
    producers before consumers."""
    nodes = list(proto.graph.node)
    ready = {i.name for i in proto.graph.input} | {t.name for t in proto.graph.initializer} | {""}
    ordered, pending = [], nodes
    while pending:
        rest = [n for n in pending if not all(i in ready for i in n.input)]
        done = [n for n in pending if all(i in ready for i in n.input)]
        if not done:
            raise QuantizeError(f"graph has a cycle or a dangling input near node {rest[0].name!r}")
        for n in done:
            ordered.append(n)
            ready.update(n.output)
        pending = rest
    del proto.graph.node[:]
    proto.graph.node.extend(ordered)


def used_domains_only(proto: onnx.ModelProto) -> None:
    """ONNX Runtime's pre-processing imports every domain it knows; keep the ones nodes use,
    so parsers that reject unknown domains (TensorRT's) see a plain ONNX graph."""
    used = {n.domain for n in proto.graph.node}
    keep = [o for o in proto.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)


def label_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes after the ArgMax: they move class ids (a reduced head resizes them as
    floats), which a Q/DQ pair would round to the quantisation grid, i.e. to other classes."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: list[str] = []
    todo = [o for n in proto.graph.node if n.op_type == "ArgMax" for o in n.output]
    while todo:
        for node in consumers.get(todo.pop(), []):
            if node.name not in found:
                found.append(node.name)
                todo.extend(node.output)
    return found


def quantize_int8(proto: onnx.ModelProto, meta: ModelMeta, reader: ImageReader, target: str, method: str,
                  chunk: int = 4) -> tuple[onnx.ModelProto, dict]:
    """Static QDQ quantisation; ``target`` picks the flavour (see the module docstring)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if target not in TARGETS:
        raise QuantizeError(f"--target must be one of {', '.join(TARGETS)}, not {target!r}")
    if method not in CALIB_METHODS:
        raise QuantizeError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, not {method!r}")
    trt = target == "tensorrt"
    calibrate = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
                 "minmax": CalibrationMethod.MinMax}[method]
    n = len(reader)
    # The calibrator keeps every intermediate tensor of a chunk in memory; a few 360x480
    # images at a time bounds that. The stride has to divide the image count.
    stride = max(d for d in range(1, min(chunk, n) + 1) if n % d == 0)
    extra = {
        "ActivationSymmetric": trt,
        "WeightSymmetric": True,
        "CalibTensorRangeSymmetric": trt,  # |x| histograms, as TensorRT's own entropy calibrator
        "CalibStridedMinMax": stride,  # (despite the name: chunked collection for every method)
        # TensorRT parses DequantizeLinear only on 8-bit inputs: no int32 biases, and weights
        # as float + Q/DQ (the QAT form every TensorRT 10/11 release accepts).
        "QuantizeBias": not trt,
        "AddQDQPairToWeight": trt,
    }
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs advice per tensor at WARNING
    try:
        with tempfile.TemporaryDirectory(prefix="dilseg-int8-") as tmp:
            pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
            # From a file, not a ModelProto: given a proto, ONNX Runtime 1.32 moves its weights into
            # an external-data file its own optimiser then cannot read (Reshape shapes, for one).
            src = Path(tmp) / "fp32.onnx"
            onnx.save(proto, str(src))
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            exclude = label_nodes(onnx.load(str(pre)))
            reader.rewind()
            with contextlib.redirect_stdout(io.StringIO()):  # the calibrator print()s its progress
                quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QInt8 if trt else QuantType.QUInt8,
                                weight_type=QuantType.QInt8, calibrate_method=calibrate, reduce_range=not trt,
                                nodes_to_exclude=exclude, extra_options=extra)
            quantized = onnx.load(str(out))
    finally:
        logging.getLogger().setLevel(quiet)
    used_domains_only(quantized)
    info = {
        "int8_target": target,
        "calibration": {
            "method": method,
            "images": n,
            "activations": "int8 symmetric (zero point 0)" if trt else "uint8 asymmetric",
            "weights": "int8 per-channel symmetric" if trt else "int8 per-channel symmetric, 7 bits (-64..64)",
        },
    }
    return quantized, info


def make_variant(proto: onnx.ModelProto, meta: ModelMeta, precision: str, calib: list[Path],
                 target: str = "tensorrt", method: str = "entropy") -> tuple[onnx.ModelProto, ModelMeta]:
    """The fp16 or int8 variant of a verified fp32 graph, with its metadata updated."""
    from .onnx_meta import attach_metadata

    if precision not in ("fp16", "int8"):
        raise QuantizeError(f"precision must be fp16 or int8 here, not {precision!r}")
    input_name = proto.graph.input[0].name
    reader = ImageReader(calib, meta, input_name, desc="fp16 range check" if precision == "fp16" else "int8 calibration")
    try:
        if precision == "fp16":
            out, info = convert_fp16(proto, meta, reader)
        else:
            out, info = quantize_int8(proto, meta, reader, target, method)
    finally:
        reader.close()
    new_meta = replace(meta, precision=precision, extra={**meta.extra, **info})
    attach_metadata(out, new_meta)
    try:
        onnx.checker.check_model(out, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise QuantizeError(f"the {precision} graph fails onnx.checker: {exc}") from None
    return out, new_meta


def export_variant(model, meta: ModelMeta, output: str | Path, size: tuple[int, int] | None, precision: str,
                   calib_dir: str | Path | None, calib_images: int = 100, target: str = "tensorrt",
                   method: str = "entropy", opset: int | None = None, min_agreement: float | None = None,
                   head: str | None = None):
    """Export a zoo model as an fp16 or int8 ONNX, verified against PyTorch, written atomically.

    The check compares argmax labels on real calibration frames: a logit tolerance means
    nothing once weights are rounded to 10 bits or 8, but a label map must still agree.
    Returns (Verification, metadata written).
    """
    from .onnx_export import DEFAULT_OPSET, ExportError, build_onnx, verify_onnx, write_onnx

    if precision not in ("fp16", "int8"):
        raise QuantizeError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if target not in TARGETS:
        raise QuantizeError(f"--target must be one of {', '.join(TARGETS)}, not {target!r}")
    if method not in CALIB_METHODS:
        raise QuantizeError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, not {method!r}")
    calib = calibration_images(calib_dir, calib_images)  # bad folders fail before the slow export
    proto, meta, _ = build_onnx(model, meta, size, opset or DEFAULT_OPSET, head=head)
    variant, vmeta = make_variant(proto, meta, precision, calib, target, method)
    picks = calib[:: max(1, len(calib) // 4)][:4]
    inputs = [preprocess(read_image(p), meta) for p in picks]
    check = verify_onnx(model, variant.SerializeToString(), vmeta, size or inputs[0].shape[2:], inputs)
    floor = MIN_AGREEMENT[precision] if min_agreement is None else min_agreement
    if check.agreement < floor:
        raise ExportError(f"the {precision} ONNX disagrees with PyTorch: argmax agreement {check.agreement:.2f}% "
                          f"< {floor}% on {len(inputs)} calibration images; nothing was written "
                          "(more --calib-images, another --calib-method, or --min-agreement to accept it)")
    write_onnx(variant, output)
    return check, vmeta


# Variants shipped beside a model file: ``NAME.onnx`` -> ``NAME.<variant>.onnx``.
SHIPPED_VARIANTS = {
    "int8cpu": ("int8", "cpu"),  # ONNX Runtime / OpenVINO on x86 CPUs (VNNI or AVX2)
    "fp16": ("fp16", None),  # GPUs; TensorRT 11 takes precision from the graph
}


def variant_path(parent: str | Path, variant: str) -> Path:
    """Where a variant of ``parent`` lives: beside it, ``edge_m_camvid.onnx`` -> ``edge_m_camvid.int8cpu.onnx``."""
    parent = Path(parent)
    return parent.with_name(f"{parent.stem}.{variant}{parent.suffix}")


def make_file_variant(parent: str | Path, variant: str, calib_dir: str | Path | None, calib_images: int = 100,
                      method: str = "entropy", output: str | Path | None = None) -> tuple[Path, ModelMeta]:
    """Build a shipped variant straight from an fp32 ONNX file (no PyTorch) and write it beside it.

    The variant's metadata names it (``extra.variant``) and its parent (file name and sha256),
    so a picker can check that a variant belongs to the file it sits next to.
    """
    from dilseg.runtime.artifact import read_onnx_meta
    from dilseg.runtime.files import atomic_write_bytes, sha256_file

    from .onnx_meta import attach_metadata

    if variant not in SHIPPED_VARIANTS:
        raise QuantizeError(f"unknown variant {variant!r}; choose one of: {', '.join(SHIPPED_VARIANTS)}")
    parent = Path(parent)
    meta = read_onnx_meta(parent)
    if meta.precision != "fp32":
        raise QuantizeError(f"{parent}: variants are made from an fp32 ONNX, this one is {meta.precision}")
    precision, target = SHIPPED_VARIANTS[variant]
    calib = calibration_images(calib_dir, calib_images)
    proto = onnx.load(str(parent))
    out, vmeta = make_variant(proto, meta, precision, calib, target or "tensorrt", method)
    vmeta = replace(vmeta, extra={**vmeta.extra, "variant": variant, "parent": parent.name,
                                  "parent_sha256": sha256_file(parent)})
    attach_metadata(out, vmeta)
    path = Path(output) if output else variant_path(parent, variant)
    atomic_write_bytes(path, out.SerializeToString())
    return path, vmeta
