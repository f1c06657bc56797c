"""The `dilseg import` command that adopts a foreign ONNX, worked out from the graph itself, for
the error a model without dilseg metadata gets from `dilseg run`, `bench`, `eval` and the demo."""

from __future__ import annotations

from pathlib import Path

from .classes import PRESETS


def import_command(path: str | Path, sess) -> str:
    """``dilseg import M.onnx -o M_dilseg.onnx --classes ...`` with what the graph tells: a preset
    whose class count matches the output's channels, --size for a dynamic input, --output when
    the graph has several outputs."""
    path = Path(path)
    out = path.with_name(f"{path.stem}_dilseg.onnx")
    outputs = sess.get_outputs()
    spatial = [o for o in outputs if len(o.shape) == 4] or outputs
    channels = spatial[0].shape[1] if spatial and len(spatial[0].shape) == 4 else None
    preset = next((name for name, c in PRESETS.items() if isinstance(channels, int) and len(c) == channels), None)
    parts = [f"dilseg import {path} -o {out} --classes {preset or 'classes.txt'}"]
    inputs = sess.get_inputs()
    if inputs and len(inputs[0].shape) == 4 and not all(isinstance(d, int) for d in inputs[0].shape[2:]):
        parts.append("--size 360x480")
    if len(outputs) > 1:
        parts.append(f"--output {spatial[0].name}")
    return " ".join(parts)


def import_advice(path: str | Path, sess) -> str:
    """One sentence: what is missing, the command, and what to adapt in it."""
    cmd = import_command(path, sess)
    notes = []
    if "--classes classes.txt" in cmd:
        notes.append("classes.txt: one class name per line, optionally followed by R G B, or a preset: "
                     + ", ".join(PRESETS))
    else:
        notes.append("the output's channel count matches that preset; give a classes file if the classes differ")
    if "--size" in cmd:
        notes.append("--size: the input size to feed its dynamic height/width (or --dynamic)")
    notes.append("add --mean/--std/--bgr unless it was trained on ImageNet-normalised RGB")
    return (f"{path}: this ONNX has no dilseg metadata, so its classes, input size and normalisation are unknown; "
            f"adopt it with `{cmd}` ({'; '.join(notes)}), then run the adopted file")
