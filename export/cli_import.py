"""`dilseg import`: a foreign segmentation ONNX -> a self-describing dilseg ONNX (torch-free)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

IMPORT_EPILOG = """\
examples:
  dilseg import segformer.onnx -o segformer_dilseg.onnx --classes ade20k
  dilseg import unet.onnx -o unet_dilseg.onnx --classes classes.txt --size 360x480 --frames ../shared/data/camvid
  dilseg import deeplab.onnx -o deeplab_dilseg.onnx --classes voc --dynamic --output out
  dilseg import bgr_net.onnx -o net.onnx --classes classes.json --bgr --mean 0.4,0.4,0.4 --std 0.25,0.25,0.25
  dilseg run --model segformer_dilseg.onnx --source drive.mp4 --output seg.mp4 --legend

The graph's output may be class scores N x C x h x w (logits or probabilities) at the input size
or at an integer stride (1/4, 1/8, ...: a bilinear Resize to the input size is added), or
integer labels N x H x W / N x 1 x H x W. ArgMax and an int32 Cast are added so that only
labels leave the model (--output-kind logits keeps the resized scores instead). The input
must be one NCHW float image with 3 channels; its size is taken from the graph where fixed.

--classes is a preset (camvid, cityscapes: 19 train ids, ade20k: 150, voc: 21, each with its
official palette) or a file: text with one class per line, "name" or "name R G B", and an
optional line "ignore_index: 255"; or JSON/YAML, a list of {"name": ..., "color": [R, G, B]}
(or {"classes": [...], "ignore_index": N}). Classes without a colour get a generated,
distinct one. --mean/--std are on pixel/255 in RGB order, as torchvision writes them
(default: ImageNet's); --bgr for networks trained on BGR input (OpenCV/Caffe).

Before anything is written the adopted graph passes onnx.checker and shape inference, and
its labels are compared with the original's argmax (scores upsampled the same way) on
--frames (default: the synthetic test pattern): below 99.9% agreement it is refused with
the figure. Outputs are complete or absent; the source file is never modified."""


def parse_triple(text: str, flag: str) -> tuple[float, float, float]:
    from dilseg.runtime.errors import CliError

    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise CliError(f"{flag} {text!r}: give three comma-separated numbers R,G,B (on pixel/255), e.g. 0.485,0.456,0.406")
    if flag == "--std" and any(v <= 0 for v in values):
        raise CliError(f"--std {text}: every value must be > 0")
    return values  # type: ignore[return-value]


def add_model_description_args(p: argparse.ArgumentParser, classes_required: bool = True) -> None:
    """--classes, --mean, --std, --bgr, --name: what a foreign model needs said about it."""
    p.add_argument("--classes", required=classes_required, metavar="FILE|PRESET",
                   help="class names and colours: camvid, cityscapes, ade20k, voc, or a classes file (see below)")
    p.add_argument("--mean", default="0.485,0.456,0.406", metavar="R,G,B",
                   help="normalisation mean on pixel/255, RGB order (default ImageNet's 0.485,0.456,0.406)")
    p.add_argument("--std", default="0.229,0.224,0.225", metavar="R,G,B",
                   help="normalisation std on pixel/255, RGB order (default ImageNet's 0.229,0.224,0.225)")
    p.add_argument("--bgr", action="store_true", help="the network takes BGR channel order (default RGB)")
    p.add_argument("--name", help="model name recorded in the metadata (default: the file's or factory's name)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="adopt a foreign segmentation ONNX (adds metadata, upsampling, argmax)",
                       epilog=IMPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Make a self-describing dilseg ONNX from any segmentation ONNX.")
    p.add_argument("model", help="the ONNX to adopt (read only)")
    p.add_argument("-o", "--out", required=True, metavar="OUT.onnx", help="the adopted ONNX to write")
    add_model_description_args(p)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size", help="input HxW dilseg feeds, for a graph with dynamic height/width, e.g. 360x480")
    size.add_argument("--dynamic", action="store_true", help="keep dynamic height/width: each frame at its own size "
                                                             "(rounded down to a multiple of 8)")
    p.add_argument("--output", metavar="NAME", help="which graph output holds the segmentation (when it has several)")
    p.add_argument("--output-kind", choices=["labels", "logits"], default="labels",
                   help="labels: ArgMax + int32 in the graph (default); logits: the scores resized to the input size")
    p.add_argument("--frames", metavar="DIR", help="images (a folder or a dataset root) to verify the adopted graph "
                                                   "on (default: the synthetic test pattern)")
    p.add_argument("--verify-frames", type=int, default=4, metavar="N", help="frames to verify on (default 4)")
    p.set_defaults(func=run_import)


def parse_hw(text: str) -> tuple[int, int]:
    from dilseg.runtime.errors import CliError

    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise CliError(f"--size must look like HxW (e.g. 360x480), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise CliError(f"--size {text}: height and width must be positive")
    return h, w


def run_import(args: argparse.Namespace) -> int:
    from dilseg.runtime.classes import load_classes
    from dilseg.runtime.errors import CliError

    from .onnx_import import adopt, write_adopted

    src, out = Path(args.model), Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise CliError(f"-o {out}: the output must end in .onnx")
    if src.exists() and out.exists() and src.resolve() == out.resolve():
        raise CliError(f"-o {out}: that is the input file; write the adopted model to a new file")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CliError(f"-o {out}: folder {parent} does not exist")
    classes = load_classes(args.classes)
    adopted = adopt(src, classes, size=parse_hw(args.size) if args.size else None, dynamic=args.dynamic,
                    output=args.output, mean=parse_triple(args.mean, "--mean"), std=parse_triple(args.std, "--std"),
                    bgr=args.bgr, output_kind=args.output_kind, frames=args.frames,
                    verify_frames=args.verify_frames, name=args.name)
    write_adopted(adopted, out)
    meta = adopted.meta
    shape = f"{meta.input_size[0]}x{meta.input_size[1]}" if meta.input_size else "dynamic"
    print(f"adopted {adopted.source.describe()}", file=sys.stderr)
    print(f"wrote {out}: {meta.model}, {meta.num_classes} classes ({classes.source}), input {shape} "
          f"{meta.color_order}, {meta.output_kind}, {meta.precision}; verified: {adopted.summary()}")
    return 0
