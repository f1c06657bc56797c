"""A dilseg ONNX with a fixed batch of one -> the same graph with a dynamic batch axis, checked.

Servers that batch requests (Triton's dynamic batcher, a multi-stream run) need the first axis
of the input and outputs free. The exporter writes batch 1 unless asked for ``--dynamic``; for
a convolutional graph whose only batch-dependent nodes read the batch from ``Shape`` (as
dilseg's Resize does), freeing the axis is a declaration change. It is proven, not assumed: the
freed graph runs a batch of two different inputs on ONNX Runtime and must give what the
original gives for each input alone. Torch-free.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from dilseg.runtime.errors import DilsegError, first_line

BATCH_AXIS = "batch"


class BatchAxisError(DilsegError, ValueError):
    """The graph's batch axis cannot be freed; the message says what to do instead."""


def batch_dim(proto: onnx.ModelProto) -> int | str | None:
    """The first input's batch dimension: an int when fixed, a name when dynamic, None when unknown."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if not dims:
        return None
    d = dims[0]
    return d.dim_value if d.HasField("dim_value") else (d.dim_param or None)


def free_batch_axis(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` whose inputs and outputs have a named (dynamic) first axis. Intermediate
    shapes recorded by shape inference are dropped, since they carry the old batch of one."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for value in [*out.graph.input, *out.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = BATCH_AXIS
    del out.graph.value_info[:]
    return out


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    from dilseg.runtime.ort_options import open_session

    # A graph that cannot batch is reported in one line, not ORT's log.
    sess = open_session(model, log_level=4)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _probe_inputs(proto: onnx.ModelProto) -> np.ndarray:
    """Two different inputs of the model's shape (batch 2), smooth enough to look like images."""
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or any(v <= 0 for v in dims[1:]):
        raise BatchAxisError("the input is not a fixed-size NCHW tensor; export it with --dynamic instead")
    _, c, h, w = dims
    elem = proto.graph.input[0].type.tensor_type.elem_type
    dtype = np.float16 if elem == onnx.TensorProto.FLOAT16 else np.float32
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([np.sin(xx / (7 + i) + yy / 11) for i in range(c)])
    b = np.stack([np.cos(yy / (5 + i) - xx / 13) * 1.5 for i in range(c)])
    return np.stack([a, b]).astype(dtype)


def with_dynamic_batch(path: str | Path) -> tuple[onnx.ModelProto, bool]:
    """(the model with a dynamic batch axis, whether it had to be freed). A model whose batch is
    already dynamic comes back unchanged. Raises BatchAxisError when the freed graph does not run
    a batch of two, or gives different outputs than two single runs."""
    path = Path(path)
    proto = onnx.load(str(path))
    if len(proto.graph.input) != 1:
        raise BatchAxisError(f"{path}: expected one image input, found {len(proto.graph.input)}")
    batch = batch_dim(proto)
    if not isinstance(batch, int):
        return proto, False
    if batch != 1:
        raise BatchAxisError(f"{path}: the input has a fixed batch of {batch}; export it with batch 1 or --dynamic")
    freed = free_batch_axis(proto)
    x = _probe_inputs(proto)
    original = proto.SerializeToString()
    try:
        both = _run(freed.SerializeToString(), x)
    except Exception as exc:  # ORT's own error types
        first = first_line(exc, 200)
        raise BatchAxisError(f"{path}: the graph does not run with a batch of 2 once its batch axis is freed "
                             f"({first}); export it with `dilseg export onnx --dynamic`") from None
    for i in range(2):
        single = _run(original, x[i:i + 1])
        if both[i:i + 1].shape != single.shape:
            raise BatchAxisError(f"{path}: with a batch of 2 the output has shape {both.shape[1:]} per item, alone "
                                 f"{single.shape[1:]}; export it with `dilseg export onnx --dynamic`")
        if np.issubdtype(single.dtype, np.integer):
            agree = float(np.mean(both[i] == single[0]))
            ok = agree >= 0.999
        else:
            ok = bool(np.allclose(both[i], single[0], atol=1e-3, rtol=1e-3))
        if not ok:
            raise BatchAxisError(f"{path}: item {i} of a batch of 2 differs from the same input run alone; the graph "
                                 "mixes the batch, so it cannot be batched; export it with `dilseg export onnx "
                                 "--dynamic` (or serve it unbatched with --max-batch-size 0)")
    return freed, True


def parse_batch(text: str) -> int | str:
    """``--batch`` of `dilseg export onnx`: a whole number >= 1 or ``dynamic``."""
    if str(text).strip().lower() == "dynamic":
        return "dynamic"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise BatchAxisError(f"--batch {text}: give a whole number of frames per inference (>= 1) or 'dynamic'")
    return value


def with_batch(path: str | Path, batch: int | str) -> onnx.ModelProto:
    """The model of ``path`` with its batch axis free (``"dynamic"``) or fixed at ``batch``,
    verified as ``with_dynamic_batch`` does; a fixed batch is then run once at that size."""
    proto, _ = with_dynamic_batch(path)
    if batch == "dynamic":
        return proto
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = int(batch)
    x = np.concatenate([_probe_inputs(free_batch_axis(proto))[:1]] * int(batch))
    try:
        _run(proto.SerializeToString(), x)
    except Exception as exc:  # ORT's own error types
        first = first_line(exc, 200)
        raise BatchAxisError(f"{path}: the graph does not run with a fixed batch of {batch} ({first}); "
                             "use --batch dynamic") from None
    return proto


def write_with_batch(src: str | Path, out: str | Path, batch: int | str) -> str:
    """Write ``src`` with its batch set (complete or absent); returns what the batch axis is now."""
    from dilseg.runtime.files import atomic_write_bytes

    proto = with_batch(src, batch)
    onnx.checker.check_model(proto)
    atomic_write_bytes(out, proto.SerializeToString())
    return "a dynamic batch" if batch == "dynamic" else f"a fixed batch of {batch}"
