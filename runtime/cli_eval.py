"""`dilseg eval` and `dilseg verify`: what an artifact delivers on data, and what a precision
variant loses against its reference, in mIoU and argmax agreement."""

from __future__ import annotations

import argparse

EVAL_EPILOG = """\
examples:
  dilseg eval --data ../shared/data/camvid                       # the shipped model on CamVid val
  dilseg eval --model edge_m_int8_cpu.onnx --data ../shared/data/camvid --json int8.json
  dilseg eval --model runs/edge_m/best.safetensors --data ../shared/data/camvid   # PyTorch (needs torch)
  dilseg eval --model edge_m.engine --data ../shared/data/camvid --split val      # TensorRT
  dilseg eval --backend openvino --ov-precision bf16 --data ../shared/data/camvid  # OpenVINO at bf16
  dilseg eval --model triton://127.0.0.1:8001/edge_m --data ../shared/data/camvid   # served by Triton

DIR holds SPLIT/images + SPLIT/labels (or images/ + labels/), matched by file stem; labels are
8-bit PNG class ids, the model's void value (CamVid: 11) is ignored. Each image goes through the
same preprocessing and postprocessing as `dilseg run`; scores are at the label's resolution.
Percentages: per-class IoU, mIoU, pixel accuracy, class-average accuracy."""

VERIFY_EPILOG = """\
examples:
  dilseg verify edge_m.onnx edge_m_fp16.onnx --data ../shared/data/camvid --min-agreement 99.5 --max-miou-drop 0.1
  dilseg verify edge_m.onnx edge_m_int8_cpu.onnx --data ../shared/data/camvid --max-miou-drop 1.0 --json v.json
  dilseg verify runs/edge_m/best.safetensors edge_m.engine --data ../shared/data/camvid
  dilseg verify edge_m.onnx edge_m_int8_cpu.onnx --backend openvino --data ../shared/data/camvid
  dilseg verify edge_m.onnx edge_m_int8_trt.onnx --data my_frames/      # plain images: agreement only
  dilseg verify edge_m.onnx triton://127.0.0.1:8001/edge_m --data ../shared/data/camvid --min-agreement 99.9

REFERENCE and CANDIDATE are any pairing of .safetensors weights (PyTorch), .onnx and .engine
files and triton:// served models of the same classes. Weights run at the input size and with the
label head of the exported side. Reported: argmax
agreement (% of pixels with the same label), the candidate's per-class IoU against the
reference's labels, and, where DIR has labels, each one's mIoU against the ground truth and the
delta (candidate - reference, points). Exit status 1 when a threshold fails, 2 on bad input."""


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="accuracy of a model on a labelled dataset (IoU, mIoU, accuracy)",
                       description="Evaluate an artifact on a labelled dataset with the runtime's own processing.",
                       epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--model", help=".onnx, .engine/.plan or .safetensors (default: the shipped CamVid model)")
    e.add_argument("--data", required=True, help="dataset root, e.g. ../shared/data/camvid")
    add_common(e)
    e.set_defaults(func=run_eval)

    v = sub.add_parser("verify", help="compare a candidate artifact (fp16, int8, engine) with a reference",
                       description="Run two artifacts over the same images and compare their label maps.",
                       epilog=VERIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("reference", help="reference artifact (.safetensors, .onnx or .engine), e.g. the fp32 ONNX")
    v.add_argument("candidate", help="candidate artifact, e.g. an fp16 / int8 ONNX or an engine")
    v.add_argument("--data", required=True, help="labelled dataset root or a plain image folder")
    v.add_argument("--max-miou-drop", type=float, help="fail (exit 1) if the candidate's mIoU is lower by more than "
                                                       "X points (needs labels)")
    v.add_argument("--min-agreement", type=float, help="fail (exit 1) if fewer than Y %% of pixels agree")
    add_common(v)
    v.set_defaults(func=run_verify)


def add_common(p: argparse.ArgumentParser) -> None:
    from .backends import backend_names

    p.add_argument("--split", default="val", help="split folder under --data when it has one (default val)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON (complete or absent)")
    p.add_argument("--backend", choices=backend_names(), default="auto",
                   help="backend for .onnx/.engine (default auto: .onnx -> ONNX Runtime, .engine/.plan -> TensorRT, "
                        ".safetensors -> PyTorch)")
    p.add_argument("--ov-precision", choices=["f32", "bf16", "f16"],
                   help="with --backend openvino: its inference precision (default: the CPU's own)")
    p.add_argument("--limit", type=image_count, default=0, metavar="N", help="only the first N images (quick checks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def image_count(text: str) -> int:
    """``--limit N``: a whole number >= 0 (0: every image), refused by argparse with exit status 2."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def backend_options(args: argparse.Namespace) -> dict:
    """Backend options given on the command line (the factory refuses one the backend lacks)."""
    return {"ov_precision": args.ov_precision} if getattr(args, "ov_precision", None) else {}


def check_json_target(path: str | None) -> None:
    """Fail before minutes of work, not after, when the JSON cannot be written."""
    from pathlib import Path

    from .errors import CliError

    if path and not (Path(path).parent if str(Path(path).parent) else Path(".")).is_dir():
        raise CliError(f"--json {path}: folder {Path(path).parent} does not exist")


def run_eval(args: argparse.Namespace) -> int:
    from .backends import open_backend
    from .defaults import resolve_model
    from .evaluate import dataset_for, eval_table, evaluate, write_json

    check_json_target(args.json)
    model = resolve_model(args.model)
    backend = open_backend(model, args.backend, **backend_options(args))
    try:
        data = dataset_for(backend.meta, args.data, args.split)
        result = evaluate(backend, data, args.limit or None, progress=not args.no_progress, name=str(model))
    finally:
        backend.close()
    print(eval_table(result))
    if args.json:
        write_json(args.json, result.to_dict())
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from .errors import CliError
    from .evaluate import check_thresholds, dataset_for, open_pair, verify, verify_table, write_json

    if args.min_agreement is not None and not 0 <= args.min_agreement <= 100:
        raise CliError(f"--min-agreement is a percentage (0..100), got {args.min_agreement}")
    if args.max_miou_drop is not None and args.max_miou_drop < 0:
        raise CliError(f"--max-miou-drop is in mIoU points and must be >= 0, got {args.max_miou_drop}")
    check_json_target(args.json)
    options = backend_options(args)
    if options:  # backend options apply to exported artifacts, which both sides then are
        from .backends import open_backend

        reference = open_backend(args.reference, args.backend, **options)
        try:
            candidate = open_backend(args.candidate, args.backend, **options)
        except BaseException:
            reference.close()
            raise
    else:
        reference, candidate = open_pair(args.reference, args.candidate, args.backend)
    try:
        data = dataset_for(reference.meta, args.data, args.split, labelled=False)
        if args.max_miou_drop is not None and data.num_classes is None:
            raise CliError(f"--max-miou-drop needs ground truth, but {args.data} has no labels/; "
                           "use --min-agreement on plain images")
        result = verify(reference, candidate, data, args.limit or None, progress=not args.no_progress,
                        names=(str(args.reference), str(args.candidate)))
    finally:
        reference.close()
        candidate.close()
    failures = check_thresholds(result, args.max_miou_drop, args.min_agreement)
    print(verify_table(result))
    if args.json:
        write_json(args.json, result.to_dict())
    return 1 if failures else 0
