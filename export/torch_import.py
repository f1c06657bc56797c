"""A user's own ``torch.nn.Module`` as a dilseg export (`dilseg export onnx --torch MODULE:FACTORY`).

The factory builds the network, the weights file fills it, and an adapter makes it look like a
zoo model to export/onnx_export.py: one NCHW image in, class scores at the input size out
(a bilinear upsampling is added for scores at a stride). The exporter then does what it does
for the zoo: label head, metadata, onnx.checker, verification against PyTorch, fp16/int8
variants through export/quantize.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dilseg.runtime.errors import DilsegError, first_line


class TorchImportError(DilsegError, ValueError):
    """The factory, its arguments, the weights or the module's output cannot be used as asked."""


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """``package.module:factory`` (importable) or ``path/to/file.py:factory``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise TorchImportError(f"--torch {spec!r}: expected MODULE:FACTORY, e.g. my_nets.seg:build or "
                               "nets/seg.py:build")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise TorchImportError(f"--torch {spec}: no such file {path}")
            name = f"dilseg_user_{path.stem}"
            loader = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[name] = module  # dataclasses and pickling look modules up by name
            sys.path.insert(0, str(path.parent.resolve()))  # so the file's own sibling imports resolve
            try:
                loader.loader.exec_module(module)
            finally:
                sys.path.remove(str(path.parent.resolve()))
        else:
            module = importlib.import_module(module_name)
    except TorchImportError:
        raise
    except ModuleNotFoundError as exc:
        raise TorchImportError(f"--torch {spec}: cannot import {module_name} ({exc}); install the package that "
                               "provides it, or give the file: path/to/file.py:FACTORY") from None
    except Exception as exc:
        raise TorchImportError(f"--torch {spec}: importing {module_name} failed: {type(exc).__name__}: "
                               f"{first_line(exc, 200)}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        public = sorted(n for n in vars(module) if callable(getattr(module, n)) and not n.startswith("_"))
        raise TorchImportError(f"--torch {spec}: {module_name} has no callable {attr!r}"
                               + (f" (it has: {', '.join(public[:8])})" if public else ""))
    return factory


def build_module(spec: str, kwargs: str | None = None) -> nn.Module:
    """Call the factory with ``--kwargs`` (a JSON object)."""
    try:
        kw = json.loads(kwargs) if kwargs else {}
    except json.JSONDecodeError as exc:
        raise TorchImportError(f"--kwargs {kwargs!r}: not valid JSON ({exc})") from None
    if not isinstance(kw, dict):
        raise TorchImportError(f"--kwargs must be a JSON object of keyword arguments, e.g. '{{\"num_labels\": 19}}'")
    factory = load_factory(spec)
    try:
        model = factory(**kw)
    except Exception as exc:
        raise TorchImportError(f"--torch {spec}: calling {spec.rpartition(':')[2]}(**{kw}) failed: "
                               f"{type(exc).__name__}: {first_line(exc, 200)}") from None
    if not isinstance(model, nn.Module):
        raise TorchImportError(f"--torch {spec}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def read_state(path: str | Path) -> dict:
    """A state_dict from .pt/.pth (also inside a checkpoint's 'state_dict' or 'model') or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise TorchImportError(f"--weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise TorchImportError(f"--weights {path}: not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, refused globals
        raise TorchImportError(f"--weights {path}: not a loadable state_dict ({type(exc).__name__}: "
                               f"{first_line(exc, 160)}); save it with torch.save(model.state_dict(), "
                               "PATH) or as .safetensors") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TorchImportError(f"--weights {path}: holds a {type(state).__name__}, not a state_dict of tensors; "
                               "save it with torch.save(model.state_dict(), PATH)")
    return dict(state)


def pick_scores(out, key: str | None, where: str) -> torch.Tensor:
    """The score tensor of a module's output: a tensor, ``.logits`` (Hugging Face), a dict's
    ``"out"`` (torchvision) or only entry, or ``key`` of a dict / index of a tuple."""
    if key is not None:
        if isinstance(out, Mapping):
            if key not in out:
                raise TorchImportError(f"{where}: --torch-output {key!r} is not among its outputs ({', '.join(map(str, out))})")
            out = out[key]
        elif isinstance(out, (tuple, list)):
            if not key.lstrip("-").isdigit() or not -len(out) <= int(key) < len(out):
                raise TorchImportError(f"{where}: returns a {type(out).__name__} of {len(out)}; --torch-output must be "
                                       f"an index 0..{len(out) - 1}")
            out = out[int(key)]
        elif hasattr(out, key):
            out = getattr(out, key)
        else:
            raise TorchImportError(f"{where}: its output ({type(out).__name__}) has no {key!r}")
    elif isinstance(out, torch.Tensor):
        pass
    elif isinstance(getattr(out, "logits", None), torch.Tensor):
        out = out.logits
    elif isinstance(out, Mapping):
        if "out" in out:
            out = out["out"]
        elif len(out) == 1:
            out = next(iter(out.values()))
        else:
            raise TorchImportError(f"{where}: returns a dict with {', '.join(map(str, out))}; pick the scores with "
                                   "--torch-output KEY")
    elif isinstance(out, (tuple, list)):
        if len(out) != 1:
            raise TorchImportError(f"{where}: returns a {type(out).__name__} of {len(out)} items; pick the scores with "
                                   "--torch-output INDEX")
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TorchImportError(f"{where}: its output is a {type(out).__name__}, not a tensor of class scores")
    return out


class Adapted(nn.Module):
    """A user's module as the exporter expects it: class scores at the input size.

    ``scores`` is the module's own output (at ``output_stride``); the export heads of
    export/heads.py use it directly when the stride is 8, like the zoo's.
    """

    def __init__(self, model: nn.Module, key: str | None, stride: int, where: str) -> None:
        super().__init__()
        self.model, self.key, self.output_stride, self.where = model, key, stride, where

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return pick_scores(self.model(x), self.key, self.where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.scores(x)
        if self.output_stride == 1:
            return scores
        return F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)


def prepare_torch(spec: str, kwargs: str | None, weights: str | None, classes, size: tuple[int, int] | None,
                  key: str | None = None, probe_size: tuple[int, int] = (256, 320)) -> tuple[Adapted, int]:
    """Build, load and adapt a user's module; returns (adapted module, output stride).

    The output is probed on one frame at the export size (or ``probe_size`` for a dynamic
    export): it must be N x C x h x w scores with C = len(classes) at an integer stride.
    """
    import numpy as np

    from .onnx_import import classify
    from .weights import WeightsError, load_state_strictly

    model = build_module(spec, kwargs)
    if weights:
        try:
            load_state_strictly(model, read_state(weights), weights)
        except WeightsError as exc:
            raise TorchImportError(str(exc)) from None
    hw = size or probe_size
    where = f"--torch {spec}"
    try:
        with torch.no_grad():
            out = pick_scores(model(torch.zeros(1, 3, *hw)), key, where)
    except TorchImportError:
        raise
    except Exception as exc:
        raise TorchImportError(f"{where}: the module fails on a 1x3x{hw[0]}x{hw[1]} input: {type(exc).__name__}: "
                               f"{first_line(exc, 200)}") from None
    found = classify("scores", out.detach().float().numpy() if out.is_floating_point() else out.numpy().astype(np.int64),
                     hw)
    if isinstance(found, str):
        raise TorchImportError(f"{where}: {found.replace('output', 'its output', 1)}")
    if found.kind == "labels":
        raise TorchImportError(f"{where}: the module returns integer labels; --torch needs its class scores "
                               "(N x C x H x W). Export it with torch.onnx.export and adopt that with `dilseg import`")
    classes.check_count(found.classes, f"{where}'s output")
    return Adapted(model, key, found.stride, where).eval(), found.stride


def run_export_torch(args) -> int:
    """`dilseg export onnx --torch MODULE:FACTORY ...`: the zoo's export path for a user's module."""
    from dilseg.runtime.classes import load_classes
    from dilseg.runtime.errors import CliError
    from dilseg.runtime.files import sha256_file
    from dilseg.runtime.metadata import ModelMeta

    from .cli import write_export
    from .cli_import import parse_hw, parse_triple

    if args.model:
        raise CliError("--model names a zoo model; with --torch your factory builds the network: drop --model")
    if not args.classes:
        raise CliError("--torch needs --classes FILE|PRESET: the names (and colours) of the classes the module "
                       "predicts, e.g. --classes cityscapes or --classes classes.txt")
    classes = load_classes(args.classes)
    size = None if args.dynamic else parse_hw(args.size)  # any size the network's stride divides
    model, stride = prepare_torch(args.torch, args.kwargs, args.weights, classes, size, args.torch_output)
    name = args.name or args.torch.rpartition(":")[2]
    meta = ModelMeta(model=name, classes=classes.names, palette=classes.palette, input_size=size,
                     output_kind=args.output_kind, color_order="BGR" if args.bgr else "RGB",
                     mean=parse_triple(args.mean, "--mean"), std=parse_triple(args.std, "--std"),
                     weights_sha256=sha256_file(args.weights) if args.weights else "",
                     ignore_index=classes.ignore_index,
                     extra={"torch": {"factory": args.torch, "kwargs": json.loads(args.kwargs or "{}"),
                                      "output_stride": stride}})
    try:
        return write_export(args, model, meta, name, size)
    except torch.onnx.errors.OnnxExporterError as exc:
        first = first_line(exc, 240) or type(exc).__name__
        raise TorchImportError(f"--torch {args.torch}: torch.onnx.export cannot export this module ({first}); try "
                               "another --size, or export it yourself with torch.onnx.export(model, x, 'm.onnx') "
                               "and adopt that file with `dilseg import`") from None
