"""`dilseg export onnx` and `dilseg train` (torch side; torch is imported only when they run)."""

from __future__ import annotations

import argparse

from dilseg.runtime.defaults import ONNX_OPSET

from .train_config import TrainConfig

EXPORT_EPILOG = """\
examples:
  dilseg export onnx --model edge_m --weights runs/edge_m/best.safetensors --size 360x480 -o edge_m.onnx
  dilseg export onnx --model edge_m --weights w.safetensors --dynamic -o edge_m_dyn.onnx
  dilseg export onnx --from edge_m.onnx --batch dynamic -o edge_m_batch.onnx   # several streams per inference
  dilseg export onnx --model edge_s --size 360x480 --output-kind logits -o untrained.onnx
  dilseg export onnx --weights w.safetensors --size 360x480 --head full -o edge_m_x8.onnx   # the paper's x8 head

precision variants (TensorRT 11 takes precision from the graph; all run on ONNX Runtime too):
  dilseg export onnx --weights W --size 360x480 --precision fp16 \
      --calib-dir ../shared/data/camvid/train -o edge_m_fp16.onnx
  dilseg export onnx --weights W --size 360x480 --precision int8 --target tensorrt \
      --calib-dir ../shared/data/camvid/train --calib-images 100 -o edge_m_int8_trt.onnx
  dilseg export onnx --weights W --size 360x480 --precision int8 --target cpu \
      --calib-dir ../shared/data/camvid/train --calib-method percentile -o edge_m_int8_cpu.onnx
  dilseg verify edge_m.onnx edge_m_int8_cpu.onnx --data ../shared/data/camvid --max-miou-drop 1

The ONNX carries its metadata (classes, palette, input size, colour order, mean/std,
output kind, model name, weights sha256, dilseg version, precision and calibration), passes
onnx.checker and is verified against PyTorch with ONNX Runtime before it is written: fp32 by
logits (|diff| <= 1e-3), fp16 and int8 by argmax agreement on calibration frames (>= 99% and
>= 90% by default; --min-agreement changes it). fp16 keeps in fp32 any op whose activations
on the calibration frames come within 4x of fp16's range. int8 --target tensorrt: symmetric
int8 activations (zero point 0), per-channel symmetric int8 weights (what TensorRT accepts);
--target cpu: uint8 asymmetric activations, per-channel int8 weights in 7 bits (fast on x86,
exact on CPUs without VNNI too: their int16 pair sums cannot saturate)."""

TRAIN_EPILOG = """\
examples:
  dilseg train --model edge_m --data ../shared/data/camvid --out runs/edge_m
  dilseg train --model edge_m --data ../shared/data/camvid --out runs/edge_m --resume
  dilseg train --model edge_m --data ../shared/data/camvid --out training/runs/strong --holdout 0006R0 \\
      --epochs 200 --scale 0.5-2.0 --photometric --thin-sampling 0.25 --ema 0.998 --workers 2
  dilseg train --model edge_s --data DIR --epochs 2 --max-train-images 16   # smoke run

DIR holds train/{images,labels} and val/{images,labels} (labels as 8-bit PNG class ids)
with the classes in DIR/classes.txt (or .json/.yaml: names, colours, ignore_index; see
`dilseg import --help`), else CamVid's 11 (11 = void); or it is a Cityscapes root
(leftImg8bit/ + gtFine/*_labelIds.png, trained on the 19 train ids). The weights record
the classes, so `dilseg export onnx --weights` labels the model with them. OUT gets last.pt (resume state), best.safetensors
(+ best.json, per-class IoU), last.safetensors and log.csv (epoch, train_loss,
holdout_miou, val_miou, lr, epoch_seconds). With --holdout the held-out sequence selects
the best epoch; the classic val (frames between training frames) is only reported."""


def register(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("export", help="export a model (PyTorch -> ONNX; ONNX -> a Triton model repository)",
                         description="Export a model.")
    exp_sub = exp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    from .cli_triton import add_parser as add_triton_parser

    add_triton_parser(exp_sub)
    p = exp_sub.add_parser("onnx", help="PyTorch -> verified, self-describing ONNX", epilog=EXPORT_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Export to a verified, self-describing ONNX: a zoo model (optionally with trained\n"
                                       "weights), your own PyTorch module (--torch), or a precision variant of an\n"
                                       "existing dilseg ONNX (--from).")
    p.add_argument("--model", help="zoo model name (default: the one the weights file names)")
    p.add_argument("--weights", help="safetensors weights from `dilseg train`, or with --torch a state_dict "
                                     "(.pt/.pth/.safetensors) (default: fresh initialisation)")
    own = p.add_argument_group("your own model (--torch) or an existing dilseg ONNX (--from)")
    own.add_argument("--torch", metavar="MODULE:FACTORY", help="build the network with a factory of yours: "
                                                               "package.module:fn or path/to/file.py:fn")
    own.add_argument("--kwargs", metavar="JSON", help="keyword arguments for the factory, e.g. '{\"num_labels\": 19}'")
    own.add_argument("--torch-output", metavar="KEY", help="which part of the module's output holds the class "
                                                           "scores (dict key or tuple index; default: the tensor, "
                                                           ".logits, or 'out')")
    own.add_argument("--from", dest="from_onnx", metavar="MODEL.onnx",
                     help="make the --precision variant of this dilseg ONNX (e.g. one from `dilseg import`), "
                          "verified against it")
    from .cli_import import add_model_description_args

    add_model_description_args(own, classes_required=False)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size", help="fixed input HxW, multiples of 8, e.g. 360x480")
    size.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    p.add_argument("--batch", metavar="N|dynamic",
                   help="frames per inference: dynamic (any batch, for multi-stream runs and Triton) or a fixed N "
                        "(default 1; --dynamic frees it too). With --from alone: re-declare that ONNX's batch")
    p.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"ONNX opset (default {ONNX_OPSET})")
    p.add_argument("--head", choices=["full", "half", "quarter", "eighth"], default=None,
                   help="labels head: half (default for zoo models at output stride 8: bilinear x4, ArgMax at 1/2 size, labels "
                        "repeated 2x2; -0.1 mIoU, 1/5 of the head's cost), full (the paper's bilinear x8 and "
                        "ArgMax at full size; the default for other models, and the only head of edge_m_os32), quarter, eighth (see export/heads.py)")
    p.add_argument("--output-kind", choices=["labels", "logits"], default="labels",
                   help="labels: argmax in the graph, int32 class ids (default); logits: NxCxHxW scores")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="fp32 (default); fp16: fp16 inside, fp32 in / int32 labels out; int8: explicit QDQ")
    p.add_argument("--target", choices=["tensorrt", "cpu"], default="tensorrt",
                   help="int8 flavour: tensorrt (int8 activations, zero point 0; default) or cpu (uint8 activations)")
    p.add_argument("--calib-dir", help="images for int8 calibration / the fp16 range check: an image folder or a "
                                       "dataset (uses images/ or train/images/), e.g. ../shared/data/camvid/train")
    p.add_argument("--calib-images", type=int, default=100, help="calibration images, spread over the folder (default 100)")
    p.add_argument("--calib-method", choices=["entropy", "percentile", "minmax"], default="entropy",
                   help="int8 range calibration (default entropy)")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="argmax agreement %% with PyTorch required before writing (default 99.9 fp32, 99 fp16, 90 int8)")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write (complete or absent)")
    p.set_defaults(func=run_export_onnx)

    t = sub.add_parser("train", help="train a zoo model from scratch on a dataset", epilog=TRAIN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a zoo model from scratch (random scale/crop/flip, class weighting, poly LR; "
                                   "optional photometric jitter, rare-class crops, label smoothing, OHEM, EMA).")
    d = TrainConfig()
    t.add_argument("--model", default=d.model, help=f"zoo model name (default {d.model})")
    t.add_argument("--data", required=True, help="dataset root with train/ and val/")
    t.add_argument("--out", required=True, help="run folder (checkpoints, log.csv); an existing run needs --resume or --overwrite")
    t.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs (default {d.epochs})")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help=f"crops per step (default {d.batch_size})")
    t.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (AdamW; default {d.lr:g})")
    t.add_argument("--crop", default="{}x{}".format(*d.crop), help="training crop HxW (default {}x{})".format(*d.crop))
    t.add_argument("--scale", default="{:g}-{:g}".format(*d.scale),
                   help="random rescale range MIN-MAX (default {:g}-{:g})".format(*d.scale))
    t.add_argument("--holdout", default=d.holdout, metavar="SEQUENCE",
                   help="hold out a whole sequence (e.g. 0006R0): train without its frames, select the best epoch on "
                        "them (train and val frames of it); the classic val is then only reported")
    t.add_argument("--train-splits", default=",".join(d.train_splits), help="comma-separated splits to train on (default train; "
                                                            "train,val for final weights: then nothing selects)")
    t.add_argument("--photometric", action="store_true", help="brightness/contrast/saturation/hue jitter, blur, noise")
    t.add_argument("--thin-sampling", type=float, default=d.thin_sampling, metavar="P",
                   help="chance that a crop is centred on a thin class (Pole, SignSymbol, Fence, Pedestrian)")
    t.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    t.add_argument("--ohem", type=float, default=d.ohem, metavar="P",
                   help="train only on pixels whose true class has probability below P (and the hardest 1/16)")
    t.add_argument("--ema", type=float, default=d.ema, metavar="DECAY",
                   help="evaluate and save an exponential moving average of the weights (e.g. 0.999 per step)")
    t.add_argument("--val-every", type=int, default=d.val_every, help="evaluate every N epochs (and after the last)")
    t.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    t.add_argument("--channels-last", action="store_true", help="channels-last memory format (faster on GPUs)")
    t.add_argument("--seed", type=int, default=d.seed, help="seed for repeatable runs")
    t.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: default)")
    t.add_argument("--workers", type=int, default=d.workers,
                   help="augmenting worker processes (default 0: in the main process); results do not depend on it")
    t.add_argument("--max-train-images", type=int, default=d.max_train_images, help="use only the first N images (smoke runs)")
    t.add_argument("--max-val-images", type=int, default=d.max_val_images, help="validate on only the first N images (smoke runs)")
    t.add_argument("--stop-after", type=int, default=d.stop_after, metavar="EPOCH",
                   help="stop after this epoch, leaving a checkpoint that --resume continues (the schedule still "
                        "runs to --epochs)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--overwrite", action="store_true", help="start over in an existing run folder (replaces its run files)")
    t.set_defaults(func=run_train)


def run_export_onnx(args: argparse.Namespace) -> int:
    from dilseg.runtime.errors import CliError

    if args.batch is not None:
        return _export_with_batch(args)
    if args.from_onnx:
        from .onnx_precision import run_from_onnx

        return run_from_onnx(args)
    if not args.size and not args.dynamic:
        raise CliError("pass --size HxW (e.g. 360x480) or --dynamic")
    if args.torch:
        from .torch_import import run_export_torch

        return run_export_torch(args)
    if args.kwargs or args.torch_output or args.bgr or args.name:
        raise CliError("--kwargs, --torch-output, --bgr and --name describe your own model: use them with --torch")

    from dilseg.export.onnx_export import parse_size
    from dilseg.export.weights import load_model
    from dilseg.runtime.files import sha256_file
    from dilseg.export.zoo import create_model

    size = None if args.dynamic else parse_size(args.size)
    from dilseg.export.weights import weights_classes
    from dilseg.runtime.classes import PRESETS, load_classes

    # The classes: --classes, else those the weights were trained on, else CamVid's.
    classes = load_classes(args.classes) if args.classes else None
    if args.weights:
        model, info = load_model(args.weights, args.model)
        name, digest = info["model"], sha256_file(args.weights)
        trained = weights_classes(info)
        if classes is not None and trained is not None and len(trained) != len(classes):
            raise CliError(f"--classes {args.classes} lists {len(classes)} classes, but {args.weights} was trained "
                           f"on {len(trained)}")
        classes = classes or trained
    else:
        if not args.model:
            raise CliError("pass --model NAME (and --weights W for a trained model)")
        classes = classes or PRESETS["camvid"]
        model, name, digest = create_model(args.model, len(classes)), args.model, ""
    classes = classes or PRESETS["camvid"]
    meta = classes.model_meta(name, output_kind=args.output_kind, weights_sha256=digest)
    if getattr(model, "num_classes", meta.num_classes) != meta.num_classes:
        raise CliError(f"the model has {model.num_classes} classes but {classes.source} lists {meta.num_classes}")
    return write_export(args, model, meta, name, size)


def _export_with_batch(args: argparse.Namespace) -> int:
    """--batch: the export as asked (or the --from file as it is), then its batch axis set and
    verified: a batch of two must give what each frame gives alone."""
    import os
    import tempfile
    from pathlib import Path

    from dilseg.export.onnx_batch import parse_batch, write_with_batch
    from dilseg.runtime.errors import CliError

    batch = parse_batch(args.batch)
    if args.dynamic:
        raise CliError("--dynamic frees the batch already (with height and width); drop --batch or --dynamic")
    out = Path(args.output)
    if args.from_onnx and args.precision == "fp32":
        src = Path(args.from_onnx)
        given = [flag for flag, value in (("--model", args.model), ("--weights", args.weights), ("--torch", args.torch),
                                          ("--size", args.size), ("--calib-dir", args.calib_dir)) if value]
        if given:
            raise CliError(f"{', '.join(given)}: --from {src.name} --batch only re-declares its batch axis; drop them")
        if not src.is_file():
            raise CliError(f"--from {src}: no such file")
        if out.exists() and src.resolve() == out.resolve():
            raise CliError(f"-o {out}: that is the --from file; write the batched model to a new file")
        what = write_with_batch(src, out, batch)
        print(f"wrote {out}: {src.name} with {what}; verified: a batch of 2 gives what each frame gives alone")
        return 0
    if not out.parent.is_dir():
        raise CliError(f"-o {out}: the folder {out.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".batch1.onnx", dir=out.parent)
    os.close(fd)
    try:
        args.output, args.batch = tmp, None
        run_export_onnx(args)
        what = write_with_batch(tmp, out, batch)
    finally:
        args.output = str(out)
        Path(tmp).unlink(missing_ok=True)
    print(f"set the batch of {out}: {what}; verified: a batch of 2 gives what each frame gives alone")
    return 0


def write_export(args: argparse.Namespace, model, meta, name: str, size: tuple[int, int] | None) -> int:
    """The fp32 export or its --precision variant, verified against PyTorch, written, reported."""
    from dilseg.export.onnx_export import export_onnx
    from dilseg.runtime.errors import CliError

    shape = "dynamic" if size is None else f"{size[0]}x{size[1]}"
    if args.precision == "fp32":
        if args.calib_dir:
            raise CliError("--calib-dir is for --precision fp16 or int8; an fp32 export needs no calibration")
        kw = {} if args.min_agreement is None else {"min_agreement": args.min_agreement}
        check = export_onnx(model, meta, args.output, size, opset=args.opset, head=args.head, **kw)
        print(f"wrote {args.output}: {name}, {shape}, {args.output_kind}, opset {args.opset}; verified: {check}")
        return 0
    from dilseg.export.quantize import export_variant

    check, vmeta = export_variant(model, meta, args.output, size, args.precision, args.calib_dir, args.calib_images,
                                  args.target, args.calib_method, args.opset, args.min_agreement,
                                  head=args.head)
    flavour = f" ({args.target} flavour, {args.calib_method} calibration on {vmeta.extra['calibration']['images']} images)" \
        if args.precision == "int8" else f" ({len(vmeta.extra['fp16_kept_fp32'])} ops kept in fp32)"
    print(f"wrote {args.output}: {name}, {shape}, {args.output_kind}, {args.precision}{flavour}; verified against "
          f"PyTorch on calibration frames: argmax agreement {check.agreement:.3f}%, max |logit diff| {check.max_abs_diff:.3g}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from dilseg.export.onnx_export import parse_size
    from dilseg.export.train import train

    from dilseg.runtime.cli import CliError

    try:
        lo, hi = (float(v) for v in args.scale.split("-"))
    except ValueError:
        raise CliError(f"--scale {args.scale!r}: expected MIN-MAX, e.g. 0.5-2.0") from None
    if not 0 < lo <= hi:
        raise CliError(f"--scale {args.scale!r}: needs 0 < MIN <= MAX")
    for name in ("epochs", "batch_size", "val_every"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers < 0 or args.threads < 0:
        raise CliError("--workers and --threads must be 0 or more")
    cfg = TrainConfig(model=args.model, data=args.data, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, crop=parse_size(args.crop, "--crop"), scale=(lo, hi), seed=args.seed, threads=args.threads,
                      workers=args.workers, val_every=args.val_every, holdout=args.holdout,
                      train_splits=tuple(s for s in args.train_splits.split(",") if s),
                      photometric=args.photometric, thin_sampling=args.thin_sampling,
                      label_smoothing=args.label_smoothing, ohem=args.ohem, ema=args.ema, amp=args.amp,
                      channels_last=args.channels_last, stop_after=args.stop_after,
                      max_train_images=args.max_train_images, max_val_images=args.max_val_images)
    best = train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"best weights: {best}")
    return 0
