"""A foreign segmentation ONNX -> a self-describing dilseg ONNX (`dilseg import`).

The graph keeps its own nodes; dilseg appends what its runtime expects at the end, built with
onnx's helper API: for class scores at a stride, a bilinear Resize to the input size (the
paper's upsampling), then ArgMax and a Cast to int32, so that only labels leave the model;
for integer labels, a Squeeze of a channel axis, a nearest Resize where they are smaller than
the input, and the same int32 Cast. The result passes onnx.checker and strict shape inference
and is compared with the original on real frames before it is written: its labels must agree
with the original's argmax at the same resolution on at least 99.9% of the pixels.

Torch-free: it needs only onnx, onnxruntime, numpy and OpenCV.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tqdm import tqdm

from dilseg import __version__
from dilseg.runtime.classes import ClassList
from dilseg.runtime.errors import DilsegError, first_line
from dilseg.runtime.metadata import METADATA_KEY, ModelMeta

MIN_AGREEMENT = 99.9
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FLOATS = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.DOUBLE: "float64",
          TensorProto.BFLOAT16: "bfloat16"}


class ModelImportError(DilsegError, ValueError):
    """A foreign ONNX that cannot be adopted as it is; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class OutputKind:
    """What one graph output holds, from its values on a real frame."""

    name: str
    kind: str  # "logits" (N x C x h x w scores) or "labels" (integer class ids)
    shape: tuple[int, ...]
    classes: int | None  # C for scores
    stride: int  # input size / output size

    def describe(self) -> str:
        what = f"{self.classes}-class scores" if self.kind == "logits" else "integer labels"
        at = "at the input size" if self.stride == 1 else f"at 1/{self.stride} of the input size"
        return f"{self.name!r}: {what} {'x'.join(map(str, self.shape))} {at}"


@dataclass
class Adopted:
    """An adopted graph ready to write, with how it was checked."""

    proto: onnx.ModelProto
    meta: ModelMeta
    source: OutputKind
    agreement: float  # % of pixels whose labels agree with the original's argmax
    max_abs_diff: float | None  # logits adoptions only: |resized original - adopted|
    frames: int
    sizes: list[tuple[int, int]] = field(default_factory=list)
    synthetic: bool = False  # verified on the synthetic test pattern (no --frames given)

    def summary(self) -> str:
        where = "synthetic test-pattern frames (pass --frames DIR to check on your own images)" if self.synthetic \
            else "real frames"
        sizes = ", ".join(f"{h}x{w}" for h, w in dict.fromkeys(self.sizes))
        diff = f", max |logit diff| {self.max_abs_diff:.2e}" if self.max_abs_diff is not None else ""
        return f"labels agree with the original's on {self.agreement:.4f}% of pixels{diff} over {self.frames} " \
               f"{where} at {sizes}"


# -- reading the graph ---------------------------------------------------------------------

def load_foreign(path: str | Path) -> onnx.ModelProto:
    """The graph, checked by onnx.checker; refused with the checker's reason if it fails."""
    path = Path(path)
    if not path.is_file():
        raise ModelImportError(f"{path}: no such file")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelImportError(f"{path}: not an ONNX model ({first_line(exc, 160) or type(exc).__name__})") \
            from None
    if not proto.graph.node:
        raise ModelImportError(f"{path}: not an ONNX model (no graph nodes)")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        first = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])[:240] or type(exc).__name__
        raise ModelImportError(f"{path}: the graph fails onnx.checker ({first}); re-export it from its framework "
                               "(e.g. torch.onnx.export) and import that file") from None
    if any(p.key == METADATA_KEY for p in proto.metadata_props):
        raise ModelImportError(f"{path}: already a dilseg model (it carries dilseg metadata; `dilseg info` shows it); "
                               "run it as it is")
    return proto


def default_opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str | None]:
    """Dimensions as ints (fixed), names (symbolic) or None (unknown)."""
    out: list[int | str | None] = []
    for d in value_info.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return out


def image_input(proto: onnx.ModelProto, path: Path) -> onnx.ValueInfoProto:
    """The one NCHW float input with 3 channels, or a clear refusal."""
    weights = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights]
    if len(inputs) != 1:
        names = ", ".join(f"{i.name!r}" for i in inputs)
        raise ModelImportError(f"{path}: the graph has {len(inputs)} inputs ({names}); dilseg feeds one image "
                               "tensor: export the model with a single NCHW image input")
    inp = inputs[0]
    elem = inp.type.tensor_type.elem_type
    if elem not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise ModelImportError(f"{path}: input {inp.name!r} is {TensorProto.DataType.Name(elem).lower()}; dilseg "
                               "feeds normalised float (or float16) images: export with a float input")
    dims = _dims(inp)
    shape = "x".join(str(d) if d is not None else "?" for d in dims)
    if len(dims) != 4:
        raise ModelImportError(f"{path}: input {inp.name!r} has shape {shape} (rank {len(dims)}); dilseg feeds one "
                               "NCHW image, N x 3 x H x W")
    if dims[1] != 3:
        if dims[3] == 3:
            raise ModelImportError(f"{path}: input {inp.name!r} is {shape}, channels last (NHWC); dilseg feeds NCHW "
                                   "(N x 3 x H x W): export the model with a channels-first input")
        got = f"{dims[1]} channel{'s' if dims[1] != 1 else ''}" if isinstance(dims[1], int) \
            else f"a dynamic channel axis ({dims[1] or '?'})"
        raise ModelImportError(f"{path}: input {inp.name!r} ({shape}) has {got}; dilseg feeds 3-channel colour "
                               "images (N x 3 x H x W)")
    return inp


def resolve_size(inp: onnx.ValueInfoProto, size: tuple[int, int] | None, dynamic: bool,
                 path: Path) -> tuple[int, int] | None:
    """The input size the metadata records: the graph's where fixed, else ``size``; None with --dynamic."""
    h, w = _dims(inp)[2:]
    fixed = isinstance(h, int) and isinstance(w, int)
    if fixed:
        if dynamic:
            raise ModelImportError(f"{path}: the graph's input is fixed at {h}x{w}, so --dynamic cannot apply; drop "
                                   "--dynamic (or re-export the model with dynamic height and width)")
        if size is not None and tuple(size) != (h, w):
            raise ModelImportError(f"{path}: the graph's input is fixed at {h}x{w}, not {size[0]}x{size[1]}; drop "
                                   f"--size (or pass --size {h}x{w})")
        return (h, w)
    if dynamic:
        if isinstance(h, int) or isinstance(w, int):
            raise ModelImportError(f"{path}: only one of the input's height and width is dynamic ({h}x{w}); pass "
                                   "--size HxW for the size dilseg should feed")
        return None
    if size is None:
        raise ModelImportError(f"{path}: the input's height and width are dynamic ({h or '?'}x{w or '?'}); pass "
                               "--size HxW (the size dilseg feeds, e.g. 360x480) or --dynamic (each frame at its "
                               "own size, rounded to a multiple of 8)")
    for name, fixed_dim, want in (("height", h, size[0]), ("width", w, size[1])):
        if isinstance(fixed_dim, int) and fixed_dim != want:
            raise ModelImportError(f"{path}: the input's {name} is fixed at {fixed_dim}, not {want}: pass a --size "
                                   f"with {name} {fixed_dim}")
    return tuple(size)


def classify(name: str, value: np.ndarray, in_hw: tuple[int, int]) -> OutputKind | str:
    """What an output holds (an OutputKind), or why it is no segmentation map (a str)."""
    shape = tuple(int(d) for d in value.shape)
    text = "x".join(map(str, shape)) or "a scalar"
    if value.ndim <= 2:
        return f"output {name!r} has shape {text}: one score per class for the whole image (a classifier), not a " \
               "per-pixel map"
    integer = np.issubdtype(value.dtype, np.integer)
    if value.ndim == 4 and integer and shape[1] != 1:
        return f"output {name!r} is an integer tensor {text}: labels must be N x H x W or N x 1 x H x W"
    if value.ndim == 3 and not integer:
        return f"output {name!r} is a rank-3 float tensor {text}: neither class scores N x C x H x W nor integer labels"
    if value.ndim > 4:
        return f"output {name!r} has rank {value.ndim} ({text}): not a segmentation map"
    if not integer and not np.issubdtype(value.dtype, np.floating):
        return f"output {name!r} is {value.dtype}: not class scores or integer labels"
    h, w = shape[-2:]
    kind = "labels" if integer else "logits"
    classes = shape[1] if kind == "logits" else None
    if classes == 1:
        return f"output {name!r} ({text}) has one score channel (a binary mask with a sigmoid): dilseg takes one " \
               "score per class; export two channels (background, foreground) or a label map"
    H, W = in_hw
    if h > H or w > W or H % h or W % w or H // h != W // w:
        return f"output {name!r} is {h}x{w} for a {H}x{W} input: not 1/s of the input for one integer stride s, so " \
               "it cannot be upsampled exactly; use an input size that is a multiple of the network's stride"
    return OutputKind(name, kind, shape, classes, H // h)


# -- the head ------------------------------------------------------------------------------

class _Names:
    """Fresh tensor/node names that cannot clash with the graph's own."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        g = proto.graph
        self.used = {n.name for n in g.node} | {o for n in g.node for o in n.output} | \
                    {t.name for t in g.initializer} | {i.name for i in g.input}

    def __call__(self, base: str) -> str:
        name, i = f"dilseg_{base}", 1
        while name in self.used:
            name, i = f"dilseg_{base}_{i}", i + 1
        self.used.add(name)
        return name


def _const(proto: onnx.ModelProto, names: _Names, base: str, value: np.ndarray) -> str:
    name = names(base)
    proto.graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _resize(proto: onnx.ModelProto, names: _Names, x: str, in_name: str, size: tuple[int, int] | None,
            nearest: bool) -> str:
    """Resize ``x`` (N x C x h x w) to the input's H x W: bilinear with half-pixel centres (PyTorch's
    align_corners=False, the paper's upsampling), or nearest taking the top-left source pixel."""
    opset = default_opset(proto)
    nodes = proto.graph.node
    shape, nc = names("shape"), names("nc")
    nodes.append(helper.make_node("Shape", [x], [shape], name=names("shape_node")))
    starts, ends = _const(proto, names, "zero", np.array([0], np.int64)), _const(proto, names, "two", np.array([2], np.int64))
    nodes.append(helper.make_node("Slice", [shape, starts, ends], [nc], name=names("nc_node")))
    if size is None:
        in_shape, hw = names("input_shape"), names("hw")
        four = _const(proto, names, "four", np.array([4], np.int64))
        nodes.append(helper.make_node("Shape", [in_name], [in_shape], name=names("input_shape_node")))
        nodes.append(helper.make_node("Slice", [in_shape, ends, four], [hw], name=names("hw_node")))
    else:
        hw = _const(proto, names, "hw", np.array(size, np.int64))
    sizes = names("sizes")
    nodes.append(helper.make_node("Concat", [nc, hw], [sizes], axis=0, name=names("sizes_node")))
    if opset >= 13:
        roi, scales = "", ""
    else:  # before opset 13 roi and scales are required inputs (empty when sizes is given)
        roi = _const(proto, names, "roi", np.array([], np.float32))
        scales = _const(proto, names, "scales", np.array([], np.float32))
    out = names("resized")
    attrs = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor") if nearest \
        else dict(mode="linear", coordinate_transformation_mode="half_pixel")
    nodes.append(helper.make_node("Resize", [x, roi, scales, sizes], [out], name=names("resize"), **attrs))
    return out


def _cast(proto: onnx.ModelProto, names: _Names, x: str, to: int, base: str) -> str:
    out = names(base)
    proto.graph.node.append(helper.make_node("Cast", [x], [out], to=to, name=names(f"{base}_node")))
    return out


def _axis1(proto: onnx.ModelProto, names: _Names, op: str, x: str) -> str:
    """Squeeze or Unsqueeze axis 1 (an input from opset 13, an attribute before)."""
    out = names(op.lower())
    if default_opset(proto) >= 13:
        axes = _const(proto, names, "axis1", np.array([1], np.int64))
        proto.graph.node.append(helper.make_node(op, [x, axes], [out], name=names(f"{op.lower()}_node")))
    else:
        proto.graph.node.append(helper.make_node(op, [x], [out], axes=[1], name=names(f"{op.lower()}_node")))
    return out


def add_head(proto: onnx.ModelProto, source: OutputKind, size: tuple[int, int] | None, output_kind: str) -> None:
    """Replace the graph's outputs by int32 labels (or resized scores) at the input size."""
    g = proto.graph
    names = _Names(proto)
    in_name = next(i.name for i in g.input if i.name not in {t.name for t in g.initializer})
    resize = source.stride > 1
    batch = _dims(next(o for o in g.output if o.name == source.name))[:1] or [None]
    x = source.name
    if source.kind == "logits":
        if resize:
            x = _resize(proto, names, x, in_name, size, nearest=False)
        if output_kind == "logits":
            out_name, elem = "logits", next(o for o in g.output if o.name == source.name).type.tensor_type.elem_type
            dims = [batch[0], source.classes, *(size or ("height", "width"))]
        else:
            argmax = names("argmax")
            g.node.append(helper.make_node("ArgMax", [x], [argmax], axis=1, keepdims=0, name=names("argmax_node")))
            x, out_name, elem = argmax, "labels", TensorProto.INT32
            dims = [batch[0], *(size or ("height", "width"))]
    else:
        if resize or len(source.shape) == 4:
            x4 = x if len(source.shape) == 4 else _axis1(proto, names, "Unsqueeze", x)
            if resize:
                # Resize on integers is not universal (TensorRT): float holds class ids exactly.
                x4 = _resize(proto, names, _cast(proto, names, x4, TensorProto.FLOAT, "label_float"), in_name, size,
                             nearest=True)
            x = _axis1(proto, names, "Squeeze", x4)
        out_name, elem = "labels", TensorProto.INT32
        dims = [batch[0], *(size or ("height", "width"))]
    if output_kind == "labels" or source.kind == "labels":
        x = _cast(proto, names, x, TensorProto.INT32, "labels_int32")
    final = out_name if out_name not in names.used else names(out_name)
    g.node.append(helper.make_node("Identity", [x], [final], name=names("output")))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(final, elem, dims))


def fix_input_size(proto: onnx.ModelProto, inp_name: str, size: tuple[int, int]) -> None:
    inp = next(i for i in proto.graph.input if i.name == inp_name)
    for d, v in zip(list(inp.type.tensor_type.shape.dim)[2:], size):
        d.Clear()
        d.dim_value = v


def keep_output(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The graph reduced to what one output needs (onnx's own Extractor)."""
    if len(proto.graph.output) == 1:
        return proto
    inp = next(i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer})
    extracted = onnx.utils.Extractor(proto).extract_model([inp], [name])
    extracted.ir_version = proto.ir_version
    extracted.producer_name, extracted.producer_version = proto.producer_name, proto.producer_version
    return extracted


def graph_precision(proto: onnx.ModelProto) -> str:
    """What the graph computes in: int8 (Q/DQ nodes), fp16 (float16 weights) or fp32."""
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node):
        return "int8"
    sizes = {TensorProto.FLOAT: 0, TensorProto.FLOAT16: 0}
    for t in proto.graph.initializer:
        if t.data_type in sizes:
            sizes[t.data_type] += int(np.prod(t.dims)) if t.dims else 1
    return "fp16" if sizes[TensorProto.FLOAT16] > sizes[TensorProto.FLOAT] else "fp32"


# -- running and checking ------------------------------------------------------------------

def _session(proto: onnx.ModelProto):
    from dilseg.runtime.ort_options import open_session

    return open_session(proto.SerializeToString(), log_level=3)


def frames_from(folder: str | Path | None, count: int) -> tuple[list[np.ndarray], bool]:
    """Up to ``count`` BGR frames spread over a folder or dataset (its val split where it has one),
    or the synthetic test pattern when no folder is given. Returns (frames, synthetic)."""
    from dilseg.runtime.dataset import DatasetError, open_images, read_image

    if folder is None:
        from dilseg.runtime.sources import test_frame

        return [test_frame(i * 37, 480, 360) for i in range(count)], True
    try:
        data = open_images(folder, "val")
    except DatasetError as exc:
        raise ModelImportError(f"--frames: {exc}") from None
    picks = np.unique(np.linspace(0, len(data.samples) - 1, min(count, len(data.samples))).round().astype(int))
    try:
        return [read_image(data.samples[i].image) for i in picks], False
    except DatasetError as exc:
        raise ModelImportError(f"--frames: {exc}") from None


def upsample_reference(value: np.ndarray, source: OutputKind, hw: tuple[int, int]) -> np.ndarray:
    """The original's output at the input size, computed independently of the graph's Resize:
    OpenCV's bilinear (half-pixel centres) for scores, block repetition for labels."""
    if source.kind == "labels":
        labels = value.reshape(value.shape[0], *value.shape[-2:])
        s = hw[0] // labels.shape[-2]
        return np.repeat(np.repeat(labels, s, axis=-2), s, axis=-1)
    scores = value.astype(np.float32)
    if scores.shape[-2:] == tuple(hw):
        return scores
    h, w = hw
    return np.stack([np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in img]) for img in scores])


def _run_original(sess, inp_name: str, x: np.ndarray, output: str | None, in_type) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()] if output is None else [output]
    try:
        values = sess.run(names, {inp_name: x.astype(in_type)})
    except Exception as exc:
        raise ModelImportError(f"ONNX Runtime cannot run the original graph on a {x.shape[2]}x{x.shape[3]} frame "
                               f"({first_line(exc, 200)})") from None
    return dict(zip(names, values))


def pick_output(values: dict[str, np.ndarray], hw: tuple[int, int], wanted: str | None, path: Path) -> OutputKind:
    """The output to adopt: ``wanted``, or the only one; refusals name what each output is."""
    if wanted is not None:
        if wanted not in values:
            raise ModelImportError(f"{path}: --output {wanted!r} is not an output of the graph (outputs: "
                                   f"{', '.join(repr(n) for n in values)})")
        found = classify(wanted, values[wanted], hw)
        if isinstance(found, str):
            raise ModelImportError(f"{path}: {found}")
        return found
    kinds = {n: classify(n, v, hw) for n, v in values.items()}
    if len(kinds) == 1:
        found = next(iter(kinds.values()))
        if isinstance(found, str):
            raise ModelImportError(f"{path}: {found}")
        return found
    listing = "; ".join(k.describe() if isinstance(k, OutputKind) else
                        f"{n!r} {'x'.join(map(str, values[n].shape))}" for n, k in kinds.items())
    if not any(isinstance(k, OutputKind) for k in kinds.values()):
        raise ModelImportError(f"{path}: none of its {len(kinds)} outputs is a per-pixel map ({listing}); this "
                               "looks like a detector or classifier, and dilseg imports segmentation models")
    raise ModelImportError(f"{path}: the graph has {len(kinds)} outputs ({listing}); pick the segmentation output "
                           "with --output NAME")


def adopt(src: str | Path, classes: ClassList, size: tuple[int, int] | None = None, dynamic: bool = False,
          output: str | None = None, mean: tuple[float, float, float] = IMAGENET_MEAN,
          std: tuple[float, float, float] = IMAGENET_STD, bgr: bool = False, output_kind: str = "labels",
          frames: str | Path | None = None, verify_frames: int = 4, name: str | None = None,
          min_agreement: float = MIN_AGREEMENT) -> Adopted:
    """Adopt a foreign segmentation ONNX: checks, head, metadata, verification (nothing is written)."""
    from dilseg.runtime.files import sha256_file
    from dilseg.runtime.metadata import MetadataError
    from dilseg.runtime.preprocess import input_size_for, preprocess

    from .onnx_meta import attach_metadata

    path = Path(src)
    if output_kind not in ("labels", "logits"):
        raise ModelImportError(f"--output-kind must be labels or logits, not {output_kind!r}")
    if verify_frames < 1:
        raise ModelImportError(f"--verify-frames must be >= 1, got {verify_frames}")
    proto = load_foreign(path)
    if default_opset(proto) < 11:
        raise ModelImportError(f"{path}: opset {default_opset(proto)} predates Resize with sizes (opset 11); "
                               "re-export the model with opset 11 or newer (17 recommended)")
    inp = image_input(proto, path)
    in_type = np.float16 if inp.type.tensor_type.elem_type == TensorProto.FLOAT16 else np.float32
    input_size = resolve_size(inp, size, dynamic, path)
    try:
        meta = ModelMeta(model=name or path.stem, classes=classes.names, palette=classes.palette,
                         input_size=input_size, output_kind=output_kind, color_order="BGR" if bgr else "RGB",
                         mean=tuple(mean), std=tuple(std), precision=graph_precision(proto),
                         weights_sha256=sha256_file(path), dilseg_version=__version__,
                         ignore_index=classes.ignore_index)
    except MetadataError as exc:
        raise ModelImportError(str(exc)) from None

    images, synthetic = frames_from(frames, verify_frames)
    tensors = [preprocess(f, meta) for f in images]
    if input_size is None:  # a dynamic graph is also checked at a second size
        h, w = input_size_for((images[0].shape[0] * 3 // 4, images[0].shape[1] * 3 // 4), meta)
        tensors.append(preprocess(cv2.resize(images[0], (w, h), interpolation=cv2.INTER_AREA), meta))

    original = _session(proto)
    first = _run_original(original, inp.name, tensors[0], None, in_type)
    source = pick_output(first, tensors[0].shape[2:], output, path)
    if source.kind == "logits":
        classes.check_count(source.classes, f"{path.name}'s output {source.name!r}")

    adopted = keep_output(proto, source.name)
    if size is not None and input_size is not None:
        fix_input_size(adopted, inp.name, input_size)
    add_head(adopted, source, input_size, output_kind)
    extra = {"imported": {"source": path.name, "output": source.name, "output_kind": source.kind,
                          "output_stride": source.stride, "opset": default_opset(proto)}}
    if output_kind == "labels":
        extra["head"] = "full"
    meta = replace(meta, extra=extra)
    if source.kind == "labels" and output_kind == "logits":
        raise ModelImportError(f"{path}: output {source.name!r} already holds labels; --output-kind logits needs a "
                               "graph that outputs class scores")
    attach_metadata(adopted, meta)
    adopted.doc_string = f"dilseg {meta.model}: imported from {path.name} ({source.describe()})"
    try:
        onnx.checker.check_model(adopted, full_check=True)
        onnx.shape_inference.infer_shapes(adopted, strict_mode=True)
    except Exception as exc:
        raise ModelImportError(f"{path}: the adopted graph fails onnx.checker ({first_line(exc, 200)}); "
                               "nothing was written") from None

    agreement, worst, sizes = compare(original, _session(adopted), tensors, source, classes, output_kind, path)
    if agreement < min_agreement:
        raise ModelImportError(f"{path}: the adopted graph's labels agree with the original's argmax on only "
                               f"{agreement:.3f}% of pixels (< {min_agreement}%) over {len(tensors)} frames; "
                               "nothing was written")
    return Adopted(adopted, meta, source, agreement, worst, len(tensors), sizes, synthetic)


def compare(original, cand, tensors: list[np.ndarray], source: OutputKind, classes: ClassList, output_kind: str,
            path: Path) -> tuple[float, float | None, list[tuple[int, int]]]:
    """Run the original and the adopted graph on the same inputs: % of pixels whose labels agree
    with the original's argmax at the input size, max |logit diff| (logits adoptions), sizes seen."""
    inp, cand_in = original.get_inputs()[0], cand.get_inputs()[0].name
    in_type = np.float16 if inp.type == "tensor(float16)" else np.float32
    same = total = 0
    worst = 0.0 if output_kind == "logits" else None
    sizes = []
    for x in tqdm(tensors, desc="verifying against the original", unit="frame", leave=False):
        ref_raw = _run_original(original, inp.name, x, source.name, in_type)[source.name]
        hw = tuple(x.shape[2:])
        found = classify(source.name, ref_raw, hw)
        if isinstance(found, str):
            raise ModelImportError(f"{path}: at {hw[0]}x{hw[1]}, {found}")
        if found.kind == "labels" and ref_raw.size and int(ref_raw.max()) >= len(classes):
            raise ModelImportError(f"{path}: output {source.name!r} holds label {int(ref_raw.max())} but "
                                   f"{classes.source} lists {len(classes)} classes (ids 0..{len(classes) - 1})")
        ref = upsample_reference(ref_raw, found, hw)
        got = cand.run(None, {cand_in: x.astype(in_type)})[0]
        if output_kind == "logits":
            worst = max(worst, float(np.abs(got.astype(np.float32) - ref).max()))
            got = got.argmax(1)
        ref_labels = ref.argmax(1) if source.kind == "logits" else ref
        if got.shape != ref_labels.shape:
            raise ModelImportError(f"{path}: the adopted graph returns {got.shape}, expected {ref_labels.shape}")
        same += int(np.count_nonzero(got == ref_labels))
        total += got.size
        sizes.append(hw)
    return 100.0 * same / max(total, 1), worst, sizes


def write_adopted(adopted: Adopted, output: str | Path) -> None:
    """Complete or absent; never over the source."""
    from dilseg.runtime.files import atomic_write_bytes

    atomic_write_bytes(output, adopted.proto.SerializeToString())
