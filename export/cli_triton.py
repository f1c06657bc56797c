"""`dilseg export triton`: a Triton Inference Server model repository for a dilseg artifact
(torch-free: only onnx, onnxruntime and tritonclient's config schema are needed)."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  dilseg export triton models/edge_m_camvid.onnx -o triton_repo                     # ONNX Runtime backend, GPU
  dilseg export triton edge_m.onnx -o triton_repo --platform python --kind cpu      # dilseg preprocessing, CPU server
  dilseg export triton edge_m.onnx -o triton_repo --platform tensorrt_plan          # then run edge_m/build_plan.sh on the GPU
  dilseg export triton edge_m.engine -o triton_repo --platform tensorrt_plan        # an engine built on the serving GPU
  dilseg export triton edge_m.onnx -o triton_repo --max-batch-size 16 --preferred-batch-size 4 \\
      --preferred-batch-size 8 --queue-delay-us 1000 --instances 2

  tritonserver --model-repository=triton_repo
  dilseg run --model triton://127.0.0.1:8001/edge_m --source 0 --show              # gRPC
  dilseg bench --model triton+http://127.0.0.1:8000/edge_m                          # HTTP

REPO/NAME/config.pbtxt is built as Triton's own ModelConfig protobuf and parsed back with
protobuf's text_format before anything is written; the model folder is complete or absent, and
other models in REPO are left alone. Its parameters carry dilseg's metadata (classes, palette,
input size, colour order, mean/std) so clients learn them from the server.

platforms:
  onnxruntime_onnx  VERSION/model.onnx on Triton's ONNX Runtime backend; clients send the
                    normalised NCHW float tensor (the stock tritonserver image runs it as is)
  tensorrt_plan     VERSION/model.plan on Triton's TensorRT backend. From an .engine: copied
                    (it must come from the server's TensorRT version and GPU). From an .onnx:
                    model.onnx and build_plan.sh, which builds the plan with trtexec on the
                    serving GPU (see the script's comments)
  python            VERSION/model.py + model.onnx: dilseg's own preprocessing and ONNX Runtime
                    in the server; clients send BGR uint8 frames (any size). The server's
                    Python needs `pip install dilseg` (no torch)

Batching (--max-batch-size > 0) needs a dynamic batch axis: a graph fixed at batch 1 is served
with the axis freed, after checking that a batch of 2 gives what each input gives alone."""


def add_parser(exp_sub: argparse._SubParsersAction) -> None:
    from .triton_repo import PLATFORMS

    p = exp_sub.add_parser("triton", help="a Triton Inference Server model repository (config.pbtxt + model)",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Write a dilseg model into a Triton model repository.")
    p.add_argument("artifact", metavar="ARTIFACT", help="a dilseg .onnx, or an .engine/.plan for tensorrt_plan")
    p.add_argument("-o", "--output", metavar="REPO", required=True, help="model repository folder (created if missing)")
    p.add_argument("--platform", choices=PLATFORMS, default="onnxruntime_onnx",
                   help="how Triton runs it (default onnxruntime_onnx)")
    p.add_argument("--name", help="model name in the repository (default: the model's own, e.g. edge_m)")
    p.add_argument("--version", type=int, default=1, help="version folder (default 1)")
    p.add_argument("--max-batch-size", type=int, default=8, help="largest batch the dynamic batcher forms "
                                                                "(default 8; 0: no batching)")
    p.add_argument("--preferred-batch-size", type=int, action="append", metavar="N",
                   help="batch sizes the batcher sends at once (repeatable; default powers of two up to the max)")
    p.add_argument("--queue-delay-us", type=int, default=0,
                   help="how long a request waits for others when the model is idle, microseconds (default 0, "
                        "Triton's own: requests arriving while it is busy are batched anyway)")
    p.add_argument("--instances", type=int, default=1, help="model instances (default 1)")
    p.add_argument("--kind", choices=["cpu", "gpu"], help="instance kind (default: cpu for python, else gpu)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads per instance "
                                                          "(python, onnxruntime_onnx; default: the backend's)")
    p.add_argument("--overwrite", action="store_true", help="replace REPO/NAME if it exists")
    p.set_defaults(func=run_export_triton)


def run_export_triton(args: argparse.Namespace) -> int:
    from .triton_repo import RepoOptions, describe, export_triton

    options = RepoOptions(platform=args.platform, name=args.name, version=args.version,
                          max_batch_size=args.max_batch_size,
                          preferred_batch_sizes=tuple(args.preferred_batch_size) if args.preferred_batch_size else None,
                          queue_delay_us=args.queue_delay_us, instances=args.instances, kind=args.kind,
                          threads=args.threads, overwrite=args.overwrite)
    print(describe(export_triton(args.artifact, args.output, options)))
    return 0
