"""The metadata every dilseg artifact carries, so that nothing downstream guesses.

An exported ONNX model stores it as JSON under the ``dilseg`` key of its metadata_props;
a TensorRT engine stores the same plus its build facts in a ``.json`` sidecar.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from .errors import DilsegError

METADATA_KEY = "dilseg"
SCHEMA_VERSION = 1


class MetadataError(DilsegError, ValueError):
    """An artifact's metadata is missing, malformed, or does not fit the artifact."""


@dataclass(frozen=True)
class ModelMeta:
    """What preprocessing, postprocessing and rendering need to know about a model."""

    model: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]  # RGB per class
    input_size: tuple[int, int] | None  # (H, W); None for a dynamic-shape model
    output_kind: str = "labels"  # "labels" (argmax in the graph) or "logits"
    layout: str = "NCHW"
    color_order: str = "RGB"  # channel order the model expects
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # on pixel/255
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    precision: str = "fp32"
    weights_sha256: str = ""
    dilseg_version: str = ""
    ignore_index: int | None = None  # label value of "void" in the training data
    extra: dict = field(default_factory=dict)  # free-form facts (e.g. int8 calibration)

    def __post_init__(self) -> None:
        if not self.classes:
            raise MetadataError("metadata lists no classes")
        if len(self.palette) != len(self.classes):
            raise MetadataError(f"palette has {len(self.palette)} colours for {len(self.classes)} classes")
        if self.output_kind not in ("labels", "logits"):
            raise MetadataError(f"output_kind must be 'labels' or 'logits', not {self.output_kind!r}")
        if self.layout != "NCHW":
            raise MetadataError(f"only NCHW layout is supported, not {self.layout!r}")
        if self.color_order not in ("RGB", "BGR"):
            raise MetadataError(f"color_order must be RGB or BGR, not {self.color_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise MetadataError(f"mean/std must be 3 values with std > 0, got {self.mean}/{self.std}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schema"] = SCHEMA_VERSION
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelMeta":
        known = {f.name for f in fields(cls)}
        missing = [name for name in ("model", "classes", "palette", "input_size") if name not in d]
        if missing:
            raise MetadataError(f"dilseg metadata lacks {', '.join(missing)}")
        kw = {k: v for k, v in d.items() if k in known}
        kw["classes"] = tuple(kw["classes"])
        kw["palette"] = tuple(tuple(int(c) for c in rgb) for rgb in kw["palette"])
        if kw["input_size"] is not None:
            kw["input_size"] = tuple(int(v) for v in kw["input_size"])
        for key in ("mean", "std"):
            if key in kw:
                kw[key] = tuple(float(v) for v in kw[key])
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str) -> "ModelMeta":
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, TypeError) as exc:
            raise MetadataError(f"dilseg metadata is not valid JSON: {exc}") from None
