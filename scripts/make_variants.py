#!/usr/bin/env python3
"""Make the variants shipped beside an fp32 dilseg ONNX: NAME.int8cpu.onnx (int8 QDQ, the
``cpu`` flavour ONNX Runtime's and OpenVINO's x86 kernels run fast) and NAME.fp16.onnx (fp16
inside, for GPUs; TensorRT 11 takes precision from the graph).

Each is made from the fp32 file itself (no PyTorch), calibrated on real images through the
model's own preprocessing, and names its variant and its parent's sha256 in its metadata,
so `auto` can check that a variant belongs to the file beside it. Measure them with
`python scripts/measure_precisions.py NAME.onnx --shipped`.

    python scripts/make_variants.py models/edge_m_camvid.onnx --calib-dir ../shared/data/camvid/train
    python scripts/make_variants.py my.onnx --variants int8cpu --calib-images 200
"""

from __future__ import annotations

import argparse
import sys

from dilseg.export.quantize import SHIPPED_VARIANTS, QuantizeError, make_file_variant
from dilseg.runtime.errors import DilsegError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("onnx", help="the fp32 dilseg ONNX")
    p.add_argument("--variants", default=",".join(SHIPPED_VARIANTS),
                   help=f"comma-separated, from {', '.join(SHIPPED_VARIANTS)} (default: all)")
    p.add_argument("--calib-dir", default="../shared/data/camvid/train", help="calibration images")
    p.add_argument("--calib-images", type=int, default=100)
    p.add_argument("--calib-method", choices=["entropy", "percentile", "minmax"], default="entropy")
    args = p.parse_args(argv)
    try:
        for variant in (v.strip() for v in args.variants.split(",") if v.strip()):
            path, meta = make_file_variant(args.onnx, variant, args.calib_dir, args.calib_images, args.calib_method)
            print(f"wrote {path}: {meta.precision}, parent {meta.extra['parent']} "
                  f"(sha256 {meta.extra['parent_sha256'][:12]}...)")
    except (QuantizeError, DilsegError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
