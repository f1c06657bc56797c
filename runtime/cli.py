"""The `dilseg` command. Each subcommand lives in the module of its stage and imports its
heavy dependencies only when it runs, so `dilseg run` works without torch installed.

The runtime's own commands are listed here; the export side's (export, train, import) and the
demo's register under the ``dilseg.commands`` entry-point group (see pyproject.toml), so the
runtime never imports them by name.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata

from dilseg import __version__

from .errors import CliError, DilsegError

__all__ = ["CliError", "build_parser", "main"]

# Modules with register(subparsers), in the order their commands are listed.
SUBCOMMAND_MODULES = (
    "dilseg.runtime.cli_run",  # run, info, bench
    "dilseg.runtime.cli_build",  # build
    "dilseg.runtime.cli_eval",  # eval, verify
)
COMMAND_ENTRY_POINTS = "dilseg.commands"

EPILOG = """\
typical flow:
  dilseg train --model edge_m --data ../shared/data/camvid --out runs/edge_m
  dilseg export onnx --model edge_m --weights runs/edge_m/best.safetensors --size 360x480 -o edge_m.onnx
  dilseg build edge_m.onnx -o edge_m.engine          # on the target GPU / Jetson
  dilseg run --source 0 --show                        # shipped default model, webcam 0
  dilseg bench --source video.mp4                     # per-stage latency and FPS

`dilseg COMMAND --help` explains each command with examples."""


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
    for ep in sorted(metadata.entry_points(group=COMMAND_ENTRY_POINTS), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from . import exit_status
    from .out_of_memory import out_of_memory

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return exit_status.SIGINT
    except DilsegError as exc:  # written for the user; anything else is a bug and keeps its traceback
        print(f"dilseg {args.command}: error: {exc}", file=sys.stderr)
        return exit_status.ERROR
    except Exception as exc:  # out of memory is the environment's limit, not a bug; the rest re-raised
        message = out_of_memory(exc)
        if message is None:
            raise
        print(f"dilseg {args.command}: error: {message}", file=sys.stderr)
        return exit_status.ERROR


if __name__ == "__main__":
    sys.exit(main())
