"""ONNX Runtime sessions that compute a model's outputs, with int8 products computed exactly.

ONNX Runtime's default int8 kernel on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI)
multiplies uint8 activations by int8 weights with saturating 16-bit intermediates, so an int8
graph's labels there are not the ones a VNNI CPU or TensorRT computes: an int8 variant with
8-bit weights lost 0.2 points of mIoU against its card and a lightly trained model's int8 export
agreed with PyTorch on 83 % of pixels instead of over 90 %. ``session.x64quantprecision``
selects an exact kernel on those CPUs and is ignored on VNNI CPUs. dilseg's own ``cpu`` int8
exports have 7-bit weights, which cannot saturate and keep the fast kernel; the option is for
every other int8 graph (a user's own quantisation, an older variant), exact but slower there.

Its graph rewrite fails on some graphs (transformer imports: "Attempt to replace the existing
tensor"). Those open at the basic optimisation level instead, where quantised nodes are not
fused into integer kernels and run as dequantise, float op, quantise: the same labels as
exact int8, more slowly, with a note saying so.
"""

from __future__ import annotations

import sys
from typing import Callable

import onnxruntime as ort

from .errors import first_line

EXACT_INT8 = ("session.x64quantprecision", "1")
CPU = ("CPUExecutionProvider",)
UNFUSED_NOTE = ("note: ONNX Runtime cannot fully optimise this graph with exact int8 kernels here; "
                "it runs with basic optimisations, int8 nodes unfused (same labels, slower)")


def open_session(model: str | bytes, providers: tuple | list = CPU,
                 configure: Callable[[ort.SessionOptions], None] | None = None,
                 log: Callable[[str], None] | None = None, log_level: int | None = None) -> ort.InferenceSession:
    """An InferenceSession of ``model`` (a path or serialised bytes); ``configure`` sets the
    caller's own options (threads, optimisation) on each SessionOptions tried; ``log_level``
    is ONNX Runtime's ``log_severity_level`` (3: errors only, 4: fatal only)."""

    def options(unfused: bool) -> ort.SessionOptions:
        so = ort.SessionOptions()
        if log_level is not None:
            so.log_severity_level = log_level
        if configure is not None:
            configure(so)
        so.add_session_config_entry(*EXACT_INT8)
        if unfused:
            so.graph_optimization_level = min(so.graph_optimization_level, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                              key=int)
        return so

    try:
        return ort.InferenceSession(model, options(False), providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - a graph ORT cannot load at all fails below with its own error
        reason = first_line(exc).rsplit(" : ", 1)[-1][:160]  # ORT's own words, not its C++ location
    session = ort.InferenceSession(model, options(True), providers=list(providers))
    (log or (lambda text: print(text, file=sys.stderr)))(f"{UNFUSED_NOTE} ({reason})")
    return session
