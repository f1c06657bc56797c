"""Writing dilseg's self-description into an ONNX graph (torch-free: `dilseg import` and the
precision variants use it without PyTorch)."""

from __future__ import annotations

import onnx

from dilseg import __version__
from dilseg.runtime.metadata import METADATA_KEY, ModelMeta


def attach_metadata(model_proto: onnx.ModelProto, meta: ModelMeta) -> None:
    del model_proto.metadata_props[:]
    entry = model_proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta.to_json()
    model_proto.producer_name = "dilseg"
    model_proto.producer_version = __version__
    model_proto.doc_string = f"dilseg {meta.model}: {meta.num_classes}-class semantic segmentation ({meta.output_kind})"
