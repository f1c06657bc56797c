"""The `dilseg` command. Each subcommand lives in the module of its stage and imports its
heavy dependencies only when it runs, so `dilseg run` works without torch installed."""

from __future__ import annotations

import argparse
import importlib
import sys

from dilseg import __version__

# (module, description) per group of subcommands; each module has register(subparsers).
SUBCOMMAND_MODULES = (
    "dilseg.export.cli",  # export, train
    "dilseg.export.cli_build",  # build
    "dilseg.runtime.cli_run",  # run, info, bench
    "dilseg.runtime.cli_eval",  # eval, verify
    "dilseg.demo.cli",  # demo
)

EPILOG = """\
typical flow:
  dilseg train --model edge_m --data ../shared/data/camvid --out runs/edge_m
  dilseg export onnx --model edge_m --weights runs/edge_m/best.safetensors --size 360x480 -o edge_m.onnx
  dilseg build edge_m.onnx -o edge_m.engine          # on the target GPU / Jetson
  dilseg run --source 0 --show                        # shipped default model, webcam 0
  dilseg bench --source video.mp4                     # per-stage latency and FPS

`dilseg COMMAND --help` explains each command with examples."""


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dilseg",
        description="Real-time semantic segmentation with dilated convolutions: PyTorch -> ONNX -> TensorRT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dilseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors carry their own message
        if type(exc).__name__ in USER_ERRORS or isinstance(exc, (CliError, OSError)):
            print(f"dilseg {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


# Errors whose message is written for the user; anything else is a bug and keeps its traceback.
USER_ERRORS = {
    "CliError", "ExportError", "WeightsError", "UnknownModelError", "MetadataError", "DatasetError",
    "BackendError", "SourceError", "SinkError", "EngineError", "BuildError", "VerifyError", "QuantizeError",
    "TrainError", "TrtCompatError",
}


if __name__ == "__main__":
    sys.exit(main())
