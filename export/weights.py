"""Safetensors weights that say which model and classes they belong to."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from torch import nn

from dilseg.runtime.errors import DilsegError
from dilseg.runtime.classes import PRESETS, ClassList, distinct_colors
from dilseg.runtime.files import atomic_write

from .zoo import create_model


class WeightsError(DilsegError, ValueError):
    """Weights that cannot be loaded into the requested model."""


def save_weights(model: nn.Module, path: str | Path, model_name: str, classes: list[str] | tuple[str, ...], **info: str) -> None:
    """Save a model's state dict with its name and classes in the safetensors header."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"model": model_name, "classes": json.dumps(list(classes))}
    meta.update({k: str(v) for k, v in info.items()})
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def read_weights_info(path: str | Path) -> dict:
    """The header metadata of a dilseg safetensors file (model name, classes, ...)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such weights file") from None
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    if "classes" in meta:
        meta["classes"] = json.loads(meta["classes"])
    return meta


def load_weights(model: nn.Module, path: str | Path, num_classes: int | None = None) -> None:
    """Load weights strictly; any missing/unexpected key or shape mismatch is a WeightsError."""
    info = read_weights_info(path)
    classes = info.get("classes")
    if num_classes is not None and classes is not None and len(classes) != num_classes:
        raise WeightsError(f"{path}: weights are for {len(classes)} classes, the model has {num_classes}")
    state = load_file(str(path))
    hint = f" (the file says it holds {info['model']!r})" if "model" in info else ""
    load_state_strictly(model, state, path, hint)


def load_state_strictly(model: nn.Module, state: dict, path: str | Path, hint: str = "") -> None:
    """``model.load_state_dict(state, strict=True)``, with one readable error naming what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if getattr(state[k], "shape", None) != own[k].shape]
    if missing or unexpected or shapes:
        lines = []
        if missing:
            lines.append(f"missing keys: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            lines.append(f"unexpected keys: {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        if shapes:
            lines.append("shape mismatches: " + "; ".join(shapes[:3]) + (" ..." if len(shapes) > 3 else ""))
        raise WeightsError(f"{path}: does not fit this model{hint}: " + " | ".join(lines))
    model.load_state_dict(state, strict=True)


def weights_classes(info: dict) -> ClassList | None:
    """The classes a weights header records: the names, and the palette and void label where
    training wrote them (CamVid's names alone mean the camvid preset)."""
    names = tuple(info.get("classes") or ())
    if not names:
        return None
    if names == PRESETS["camvid"].names and "palette" not in info:
        return PRESETS["camvid"]
    try:
        palette = tuple(tuple(int(v) for v in c) for c in json.loads(info["palette"])) if "palette" in info \
            else tuple(distinct_colors(len(names)))
        ignore = int(info["ignore_index"]) if info.get("ignore_index") not in (None, "", "None") else None
    except (ValueError, TypeError) as exc:
        raise WeightsError(f"the weights header's palette or ignore_index is malformed ({exc})") from None
    if len(palette) != len(names):
        raise WeightsError(f"the weights header lists {len(names)} classes but {len(palette)} colours")
    return ClassList(names, palette, ignore, "the weights file's header")


def load_model(path: str | Path, model_name: str | None = None) -> tuple[nn.Module, dict]:
    """Build the model a weights file names (or ``model_name``) and load the file into it."""
    info = read_weights_info(path)
    name = model_name or info.get("model")
    if not name:
        raise WeightsError(f"{path}: the file does not name its model; pass --model NAME")
    classes = info.get("classes") or []
    model = create_model(name, len(classes) if classes else 11)
    load_weights(model, path, len(classes) if classes else None)
    info["model"] = name
    return model, info
