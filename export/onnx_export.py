"""PyTorch -> self-describing ONNX, checked with onnx.checker and verified with ONNX Runtime."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from dilseg import __version__
from dilseg.runtime.defaults import ONNX_OPSET
from dilseg.runtime.errors import DilsegError
from dilseg.runtime.metadata import ModelMeta

from .heads import HeadError, LabelHead, resolve_head
from .onnx_meta import attach_metadata  # noqa: F401 (re-exported: callers import it from here)

DEFAULT_OPSET = ONNX_OPSET


class ExportError(DilsegError, ValueError):
    """The export cannot proceed or its result failed verification."""


class _LogitsOnly(nn.Module):
    """A logits export: the model's own full-resolution output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def wrap_for_export(model: nn.Module, output_kind: str, head: str = "full", dynamic: bool = False) -> nn.Module:
    """The module torch exports: the model with its label head, or the model alone for logits."""
    if output_kind == "labels":
        return LabelHead(model, head, crop=dynamic)
    return _LogitsOnly(model)


def head_of(meta: ModelMeta) -> str:
    """The head an exported graph was built with (graphs from before heads existed: full)."""
    return meta.extra.get("head", "full") if meta.output_kind == "labels" else "full"


def parse_size(text: str, flag: str = "--size") -> tuple[int, int]:
    """'360x480' -> (360, 480); both multiples of 8 (the models' output stride). ``flag`` names the
    option in the error."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ExportError(f"{flag} must look like HxW (e.g. 360x480), got {text!r}") from None
    if h <= 0 or w <= 0 or h % 8 or w % 8:
        raise ExportError(f"{flag} {h}x{w}: height and width must be positive multiples of 8 (the output stride); "
                          f"try {max(8, h - h % 8)}x{max(8, w - w % 8)}")
    return h, w


def torch_to_onnx_bytes(model: nn.Module, sample: torch.Tensor, output_kind: str, dynamic: bool, opset: int,
                        head: str = "full") -> bytes:
    wrapped = wrap_for_export(model, output_kind, head, dynamic).eval()
    out_name = "labels" if output_kind == "labels" else "logits"
    axes = None
    if dynamic:
        axes = {"input": {0: "batch", 2: "height", 3: "width"}}
        axes[out_name] = {0: "batch", 1: "height", 2: "width"} if output_kind == "labels" else {0: "batch", 2: "height", 3: "width"}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, sample, buf, opset_version=opset, input_names=["input"], output_names=[out_name],
                          dynamic_axes=axes, do_constant_folding=True, dynamo=False)
    return buf.getvalue()


def with_logits_output(model_proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a labels graph that also returns the logits feeding its ArgMax (for verification)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model_proto)
    argmax = [n for n in copy.graph.node if n.op_type == "ArgMax"]
    if not argmax:
        raise ExportError("labels graph has no ArgMax node")
    name = argmax[-1].input[0]
    inferred = onnx.shape_inference.infer_shapes(copy)
    elem = next((vi.type.tensor_type.elem_type for vi in inferred.graph.value_info if vi.name == name), onnx.TensorProto.FLOAT)
    copy.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return copy


def check_labels_match_logits(labels: np.ndarray, logits: np.ndarray, precision: str) -> None:
    """The graph's own ArgMax must pick a maximal logit. Below fp32 the runtime may take the
    ArgMax on values that were not rounded the way the exposed logits are, so near-ties may
    resolve either way: allow a pick within fp16 rounding (2**-10 relative) of the maximum."""
    if precision == "fp32":
        if not np.array_equal(labels, logits.argmax(1)):
            raise ExportError("the graph's labels disagree with the argmax of its own logits")
        return
    picked = np.take_along_axis(logits, labels[:, None].astype(np.int64), 1)[:, 0]
    best = logits.max(1)
    if np.any(picked < best - (np.abs(best) * 2.0**-9 + 1e-3)):
        raise ExportError("the graph's labels disagree with the argmax of its own logits")


def logits_labels(labels: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """The labels at the logits' resolution: a reduced head repeats each of its labels over a
    block, so the top-left pixel of every block is the label its ArgMax chose."""
    step_h, step_w = labels.shape[-2] // logits.shape[-2], labels.shape[-1] // logits.shape[-1]
    return labels[..., ::max(step_h, 1), ::max(step_w, 1)][..., : logits.shape[-2], : logits.shape[-1]]


@dataclass
class Verification:
    max_abs_diff: float
    agreement: float  # % of pixels whose argmax agrees
    inputs: int

    def __str__(self) -> str:
        return f"max |logit diff| {self.max_abs_diff:.2e}, argmax agreement {self.agreement:.4f}% over {self.inputs} inputs"


def verification_inputs(meta: ModelMeta, size: tuple[int, int], n: int = 3, seed: int = 0) -> list[np.ndarray]:
    """Deterministic image-like inputs (smooth gradients plus noise) through the runtime's preprocessing."""
    from dilseg.runtime.preprocess import normalize

    rng = np.random.default_rng(seed)
    h, w = size
    frames = []
    for i in range(n):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (h + w) * 255], -1)
        frame = np.clip(base * (0.5 + 0.5 * i / max(1, n - 1)) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        frames.append(normalize(frame, meta))
    return frames


def verify_onnx(model: nn.Module, model_bytes: bytes, meta: ModelMeta, size: tuple[int, int],
                inputs: list[np.ndarray] | None = None) -> Verification:
    """Run PyTorch and ONNX Runtime on the same inputs; compare logits and argmax.

    PyTorch runs the same head as the graph (``head`` in the metadata), so the logits
    compared are the ones its ArgMax reads, at that head's resolution.
    """
    from dilseg.runtime.ort_options import open_session

    proto = onnx.load_from_string(model_bytes)
    if meta.output_kind == "labels":
        proto = with_logits_output(proto)
    sess = open_session(proto.SerializeToString())
    in_name = sess.get_inputs()[0].name
    in_type = np.float16 if sess.get_inputs()[0].type == "tensor(float16)" else np.float32
    inputs = inputs if inputs is not None else verification_inputs(meta, size)
    worst, agree, total = 0.0, 0, 0
    wrapped = wrap_for_export(model, meta.output_kind, head_of(meta), meta.input_size is None).eval()
    for x in inputs:
        with torch.no_grad():
            xt = torch.from_numpy(x)
            ref_logits = wrapped.logits(xt)
            ref_labels = (wrapped(xt) if meta.output_kind == "labels" else ref_logits.argmax(1)).numpy()
            ref_logits = ref_logits.numpy()
        outs = sess.run(None, {in_name: x.astype(in_type)})
        logits = outs[-1].astype(np.float32)
        worst = max(worst, float(np.abs(logits - ref_logits).max()))
        labels = outs[0] if meta.output_kind == "labels" else logits.argmax(1)
        if meta.output_kind == "labels":
            check_labels_match_logits(logits_labels(labels, logits), logits, meta.precision)
        agree += int((labels == ref_labels).sum())
        total += labels.size
    return Verification(worst, 100.0 * agree / total, len(inputs))


def build_onnx(
    model: nn.Module,
    meta: ModelMeta,
    size: tuple[int, int] | None,
    opset: int = DEFAULT_OPSET,
    max_abs_diff: float = 1e-3,
    min_agreement: float = 99.9,
    head: str | None = None,
) -> tuple[onnx.ModelProto, ModelMeta, Verification]:
    """Export to an in-memory fp32 graph with metadata, checked and verified against PyTorch.

    ``head`` is one of export/heads.py's HEADS (None: DEFAULT_HEAD where the model exposes
    its stride-8 scores, else full); the metadata records it. The precision variants
    (export/quantize.py) start from this verified graph.
    """
    if opset < 13:
        raise ExportError(f"--opset {opset}: dilseg needs opset >= 13 (Resize with sizes, int32 casts)")
    try:
        head = resolve_head(model, head, meta.output_kind)
    except HeadError as exc:
        raise ExportError(str(exc)) from None
    dynamic = size is None
    trace_size = size or (256, 320)
    extra = {**meta.extra, "head": head} if meta.output_kind == "labels" else dict(meta.extra)
    meta = replace(meta, input_size=size, dilseg_version=__version__, extra=extra)
    sample = torch.zeros(1, 3, *trace_size)
    model.eval()
    proto = onnx.load_from_string(torch_to_onnx_bytes(model, sample, meta.output_kind, dynamic, opset, head))
    attach_metadata(proto, meta)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported graph fails onnx.checker: {exc}") from None
    # A dynamic model is verified at a size other than the one it was traced at.
    check = verify_onnx(model, proto.SerializeToString(), meta,
                        (trace_size[0] + 64, trace_size[1] + 32) if dynamic else trace_size)
    if check.max_abs_diff > max_abs_diff or check.agreement < min_agreement:
        raise ExportError(f"ONNX Runtime disagrees with PyTorch: {check} "
                          f"(limits: diff <= {max_abs_diff}, agreement >= {min_agreement}%); nothing was written")
    return proto, meta, check


def write_onnx(proto: onnx.ModelProto, output: str | Path) -> None:
    """Write complete or not at all."""
    from dilseg.runtime.files import atomic_write

    data = proto.SerializeToString()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(output, write)


def export_onnx(
    model: nn.Module,
    meta: ModelMeta,
    output: str | Path,
    size: tuple[int, int] | None,
    opset: int = DEFAULT_OPSET,
    max_abs_diff: float = 1e-3,
    min_agreement: float = 99.9,
    head: str | None = None,
) -> Verification:
    """Export, attach metadata, check, verify against PyTorch, then write atomically."""
    proto, _, check = build_onnx(model, meta, size, opset, max_abs_diff, min_agreement, head)
    write_onnx(proto, output)
    return check
