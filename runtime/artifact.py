"""Reading an artifact's self-description without torch or onnx: ONNX metadata or engine sidecar."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import first_line, os_errors_as
from .metadata import METADATA_KEY, MetadataError, ModelMeta

ONNX_SUFFIX = ".onnx"
ENGINE_SUFFIXES = (".engine", ".plan")  # a TensorRT engine, with its sidecar ENGINE.json
WEIGHTS_SUFFIX = ".safetensors"  # weights from `dilseg train` (run on PyTorch)


def artifact_suffix(path: str | Path) -> str:
    """The suffix that says what an artifact is (lower case)."""
    return Path(path).suffix.lower()


def is_engine(path: str | Path) -> bool:
    return artifact_suffix(path) in ENGINE_SUFFIXES


def sidecar_path(engine: str | Path) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def read_onnx_meta(path: str | Path) -> ModelMeta:
    """The dilseg metadata of an ONNX file (read with ONNX Runtime, which every install has)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path}: no such file")
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise MetadataError(f"{path}: not a loadable ONNX model ({first_line(exc, 200)})") from None
    return session_meta(path, sess)


def session_meta(path: str | Path, sess) -> ModelMeta:
    """The dilseg metadata of an ONNX Runtime session's model, checked against its outputs."""
    props = sess.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        from .import_hint import import_advice

        raise MetadataError(import_advice(path, sess))
    meta = ModelMeta.from_json(props[METADATA_KEY])
    check_onnx_io(Path(path), sess, meta)
    return meta


def check_onnx_io(path: Path, sess, meta: ModelMeta) -> None:
    """The graph's outputs must be what the metadata promises (labels NxHxW or logits NxCxHxW)."""
    outs = sess.get_outputs()
    if not outs:
        raise MetadataError(f"{path}: the model has no outputs")
    ins = sess.get_inputs()
    shape = list(ins[0].shape) if ins else []
    if meta.input_size is not None and len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]):
        graph = (shape[2], shape[3])
        if graph != tuple(meta.input_size):
            # Else ONNX Runtime refuses every frame with INVALID_ARGUMENT about "input" dimensions.
            raise MetadataError(
                f"{path}: its metadata says the input is {meta.input_size[0]}x{meta.input_size[1]} (HxW) but the "
                f"graph takes {graph[0]}x{graph[1]}; re-export it, or re-import it with `dilseg import` and the "
                "graph's size")
    rank = len(outs[0].shape)
    want = 3 if meta.output_kind == "labels" else 4
    if rank != want:
        raise MetadataError(f"{path}: metadata says {meta.output_kind} but the first output has rank {rank} (expected {want})")
    if meta.output_kind == "logits":
        c = outs[0].shape[1]
        if isinstance(c, int) and c != meta.num_classes:
            raise MetadataError(f"{path}: the model outputs {c} classes but its metadata lists {meta.num_classes}")


def read_sidecar(engine: str | Path) -> dict:
    """The JSON sidecar of a TensorRT engine (model metadata plus build facts)."""
    path = sidecar_path(engine)
    if not path.is_file():
        raise MetadataError(f"{engine}: no sidecar {path.name} beside the engine; rebuild it with `dilseg build`")
    try:
        with os_errors_as(MetadataError, path, "read the sidecar"):
            return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MetadataError(f"{path}: corrupt sidecar ({exc}); rebuild the engine with `dilseg build`") from None


def read_meta(path: str | Path) -> ModelMeta:
    """Metadata of an .onnx or a TensorRT engine (.engine / .plan, from its sidecar)."""
    path = Path(path)
    if is_engine(path):
        side = read_sidecar(path)
        if "meta" not in side:
            raise MetadataError(f"{sidecar_path(path)}: sidecar lacks the model metadata; rebuild the engine")
        return ModelMeta.from_dict(side["meta"])
    return read_onnx_meta(path)
