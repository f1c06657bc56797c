"""The fp16 or int8 variant of an existing fp32 dilseg ONNX, verified against that ONNX
(`dilseg export onnx --from MODEL.onnx --precision fp16|int8`).

This is the precision path of graphs that have no PyTorch module behind them, such as those
`dilseg import` writes: the variant is made by export/quantize.py exactly as for the zoo, and
its labels are compared with the fp32 graph's on calibration frames with ONNX Runtime.
Torch-free.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx

from dilseg.runtime.errors import CliError

from .quantize import MIN_AGREEMENT, QuantizeError, calibration_images, make_variant


def labels_of(sess, x: np.ndarray, output_kind: str) -> np.ndarray:
    inp = sess.get_inputs()[0]
    out = sess.run(None, {inp.name: x.astype(np.float16 if inp.type == "tensor(float16)" else np.float32)})[0]
    return out.argmax(1) if output_kind == "logits" else out


def run_from_onnx(args: argparse.Namespace) -> int:
    from dilseg.runtime.artifact import read_onnx_meta
    from dilseg.runtime.dataset import read_image
    from dilseg.runtime.files import atomic_write_bytes
    from dilseg.runtime.ort_options import open_session
    from dilseg.runtime.preprocess import preprocess

    src, out = Path(args.from_onnx), Path(args.output)
    given = [flag for flag, value in (("--model", args.model), ("--weights", args.weights), ("--torch", args.torch),
                                      ("--size", args.size), ("--dynamic", args.dynamic), ("--classes", args.classes),
                                      ("--kwargs", args.kwargs), ("--name", args.name), ("--bgr", args.bgr))
             if value]
    if given:
        raise CliError(f"{', '.join(given)}: --from takes everything (classes, size, normalisation) from "
                       f"{src.name}'s metadata; drop them")
    if args.precision == "fp32":
        raise CliError("--from makes a precision variant: pass --precision fp16 or --precision int8")
    if src.exists() and out.exists() and src.resolve() == out.resolve():
        raise CliError(f"-o {out}: that is the --from file; write the variant to a new file")
    meta = read_onnx_meta(src)
    if meta.precision != "fp32":
        raise CliError(f"--from {src}: it is already {meta.precision}; variants are made from an fp32 graph")
    calib = calibration_images(args.calib_dir, args.calib_images)
    proto = onnx.load(str(src))
    variant, vmeta = make_variant(proto, meta, args.precision, calib, args.target, args.calib_method)

    ref = open_session(str(src), log_level=3)
    cand = open_session(variant.SerializeToString(), log_level=3)
    picks = calib[:: max(1, len(calib) // 4)][:4]
    same = total = 0
    for path in picks:
        x = preprocess(read_image(path), meta)
        a, b = labels_of(ref, x, meta.output_kind), labels_of(cand, x, meta.output_kind)
        same += int(np.count_nonzero(a == b))
        total += a.size
    agreement = 100.0 * same / max(total, 1)
    floor = MIN_AGREEMENT[args.precision] if args.min_agreement is None else args.min_agreement
    if agreement < floor:
        raise QuantizeError(f"the {args.precision} variant agrees with {src.name} on {agreement:.2f}% of pixels "
                            f"(< {floor}%) on {len(picks)} calibration images; nothing was written (more "
                            "--calib-images, another --calib-method, or --min-agreement to accept it)")
    atomic_write_bytes(out, variant.SerializeToString())
    flavour = f"{args.target} flavour, {args.calib_method} calibration on {len(calib)} images" \
        if args.precision == "int8" else f"{len(vmeta.extra['fp16_kept_fp32'])} ops kept in fp32"
    print(f"wrote {out}: {meta.model}, {args.precision} ({flavour}); verified against {src.name} on "
          f"{len(picks)} calibration images: label agreement {agreement:.3f}%")
    return 0
