"""Defaults used by more than one module, in one place: the shipped model and how a command
finds the model it runs, the ONNX opset, the TensorRT builder's workspace."""

from __future__ import annotations

from pathlib import Path

from .errors import CliError

DEFAULT_MODEL_FILE = "edge_m_camvid.onnx"
ONNX_OPSET = 17  # what `dilseg export onnx` writes: TensorRT 10.x/11.x and ONNX Runtime all parse it
TRT_WORKSPACE_MIB = 1024  # TensorRT builder workspace limit (`dilseg build --workspace`, the engine cache)


def default_model_path() -> Path:
    """The shipped CamVid ONNX model: `dilseg run`, `dilseg bench` and the demo use it by default."""
    import dilseg.models

    return Path(dilseg.models.__file__).with_name(DEFAULT_MODEL_FILE)


def resolve_model(arg: str | Path | None, flag: str = "--model") -> Path | str:
    """The model a command runs: the file given (which must exist), a shipped model by name
    (``edge_m_camvid``), a model served by Triton (``triton://HOST:PORT/MODEL``, returned as the
    string it is) or the shipped default."""
    from .triton_url import is_triton_url, parse_triton_url

    if is_triton_url(arg):
        parse_triton_url(arg)  # a malformed URL fails here, before sources and sinks open
        return arg
    if arg:
        path = Path(arg).expanduser()
        if not path.exists() and not path.suffix and path.name == str(arg):  # a bare name, no folder
            shipped = default_model_path().with_name(f"{arg}.onnx")
            if shipped.is_file():
                return shipped  # a shipped model by name (edge_m_camvid): `auto` then picks its variant
        if not path.is_file():
            what = "is a folder, not a model file" if path.is_dir() else "no such file"
            raise CliError(f"{flag} {arg}: {what}; pass an .onnx from `dilseg export onnx`, an .engine from "
                           "`dilseg build` or .safetensors weights from `dilseg train`")
        return path
    path = default_model_path()
    if not path.is_file():
        raise CliError(f"the shipped model {path.name} is missing from this install ({path}); reinstall dilseg or "
                       f"pass {flag} FILE.onnx, e.g. one made with `dilseg export onnx --model edge_m --size 360x480 "
                       "-o edge_m.onnx`")
    return path
