"""Torch-free runtime: source -> preprocess -> backend -> postprocess -> sink.

The library's face::

    from dilseg.runtime import open_segmenter, open_source, open_sink, Pipeline, ViewSettings

    seg = open_segmenter("model.onnx")            # or no argument: the shipped CamVid model
    result = seg.process(frame)                   # labels at frame size, per-stage timings
    overlay = seg.render(result, ViewSettings())  # on the GPU where the backend can
    stats = Pipeline(open_source("0"), seg, [open_sink("out.mp4")]).run()

Names are imported on first use, so ``import dilseg.runtime.errors`` (say) loads nothing else.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "open_segmenter": "segmenter", "Segmenter": "segmenter", "Segmentation": "segmenter",
    "open_source": "sources", "Source": "sources", "NewestFrame": "sources", "PushSource": "sources",
    "open_sink": "sinks", "Sink": "sinks", "LatestSink": "sinks",
    "Pipeline": "pipeline", "PipelineStats": "pipeline", "FrameResult": "pipeline",
    "ViewSettings": "view",
    "DilsegError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
