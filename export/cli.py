"""`dilseg export onnx` and `dilseg train` (torch side; torch is imported only when they run)."""

from __future__ import annotations

import argparse

EXPORT_EPILOG = """\
examples:
  dilseg export onnx --model edge_m --weights runs/edge_m/best.safetensors --size 360x480 -o edge_m.onnx
  dilseg export onnx --model edge_m --weights w.safetensors --dynamic -o edge_m_dyn.onnx
  dilseg export onnx --model edge_s --size 360x480 --output-kind logits -o untrained.onnx

The ONNX carries its metadata (classes, palette, input size, colour order, mean/std,
output kind, model name, weights sha256, dilseg version), passes onnx.checker and is
verified against PyTorch with ONNX Runtime before it is written."""

TRAIN_EPILOG = """\
examples:
  dilseg train --model edge_m --data ../shared/data/camvid --out runs/edge_m
  dilseg train --model edge_m --data ../shared/data/camvid --out runs/edge_m --resume
  dilseg train --model edge_s --data DIR --epochs 2 --max-train-images 16   # smoke run

DIR holds train/{images,labels} and val/{images,labels} (CamVid layout, labels as
8-bit PNG class ids, 11 = void). OUT gets last.pt (resume state), best.safetensors,
last.safetensors and log.csv (epoch, train_loss, val_miou, lr, epoch_seconds)."""


def register(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("export", help="export a model (PyTorch -> ONNX)", description="Export a model.")
    exp_sub = exp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    p = exp_sub.add_parser("onnx", help="PyTorch -> verified, self-describing ONNX", epilog=EXPORT_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Export a zoo model (optionally with trained weights) to ONNX.")
    p.add_argument("--model", help="zoo model name (default: the one the weights file names)")
    p.add_argument("--weights", help="safetensors weights from `dilseg train` (default: fresh initialisation)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--size", help="fixed input HxW, multiples of 8, e.g. 360x480")
    size.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--output-kind", choices=["labels", "logits"], default="labels",
                   help="labels: argmax in the graph, int32 class ids (default); logits: NxCxHxW scores")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write (complete or absent)")
    p.set_defaults(func=run_export_onnx)

    t = sub.add_parser("train", help="train a zoo model from scratch on a dataset", epilog=TRAIN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a zoo model from scratch (random scale/crop/flip, class weighting, poly LR).")
    t.add_argument("--model", default="edge_m", help="zoo model name (default edge_m)")
    t.add_argument("--data", required=True, help="dataset root with train/ and val/")
    t.add_argument("--out", required=True, help="run folder (checkpoints, log.csv)")
    t.add_argument("--epochs", type=int, default=60, help="epochs (default 60: about 1-2 h for edge_m on 2 cores)")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    t.add_argument("--crop", default="320x416", help="training crop HxW (default 320x416)")
    t.add_argument("--seed", type=int, default=0, help="seed for repeatable runs")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    t.add_argument("--max-train-images", type=int, default=0, help="use only the first N images (smoke runs)")
    t.add_argument("--max-val-images", type=int, default=0, help="validate on only the first N images (smoke runs)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.set_defaults(func=run_train)


def run_export_onnx(args: argparse.Namespace) -> int:
    from dilseg.export.onnx_export import export_onnx, parse_size
    from dilseg.export.train import camvid_meta
    from dilseg.export.weights import load_model, sha256_file
    from dilseg.export.zoo import create_model
    from dilseg.runtime.cli import CliError

    size = None if args.dynamic else parse_size(args.size)
    if args.weights:
        model, info = load_model(args.weights, args.model)
        name, digest = info["model"], sha256_file(args.weights)
    else:
        if not args.model:
            raise CliError("pass --model NAME (and --weights W for a trained model)")
        model, name, digest = create_model(args.model), args.model, ""
    from dataclasses import replace

    meta = replace(camvid_meta(name), output_kind=args.output_kind, weights_sha256=digest)
    if getattr(model, "num_classes", meta.num_classes) != meta.num_classes:
        raise CliError(f"model has {model.num_classes} classes; only {meta.num_classes}-class CamVid metadata is known")
    check = export_onnx(model, meta, args.output, size, opset=args.opset)
    print(f"wrote {args.output}: {name}, {'dynamic' if size is None else f'{size[0]}x{size[1]}'}, "
          f"{args.output_kind}, opset {args.opset}; verified: {check}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from dilseg.export.onnx_export import parse_size
    from dilseg.export.train import TrainConfig, train

    cfg = TrainConfig(model=args.model, data=args.data, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, crop=parse_size(args.crop), seed=args.seed, threads=args.threads,
                      max_train_images=args.max_train_images, max_val_images=args.max_val_images)
    best = train(cfg, resume=args.resume)
    print(f"best weights: {best}")
    return 0
