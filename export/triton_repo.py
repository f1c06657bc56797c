"""`dilseg export triton`: a dilseg artifact -> one model of a Triton Inference Server repository.

    REPO/NAME/config.pbtxt           inputs, outputs, max_batch_size, dynamic_batching,
                                     instance_group, and dilseg's metadata in ``parameters``
    REPO/NAME/VERSION/model.onnx     --platform onnxruntime_onnx (Triton's ONNX Runtime backend)
    REPO/NAME/VERSION/model.plan     --platform tensorrt_plan from an engine built for the server
    REPO/NAME/build_plan.sh          --platform tensorrt_plan from an .onnx: builds VERSION/model.plan
                                     with trtexec on the serving GPU (engines are not portable)
    REPO/NAME/VERSION/model.py       --platform python: dilseg's preprocessing + ONNX Runtime, taking
                                     plain BGR uint8 frames (CPU servers, thin clients)

The config is built as Triton's own ``ModelConfig`` protobuf (``tritonclient.grpc.model_config_pb2``),
written as text, and parsed back with protobuf's text_format and checked (``check_config``)
before the model folder appears: the folder is complete or absent, and other models in REPO
are left alone. ``parameters`` carry ``dilseg`` (the ModelMeta JSON: classes, palette, input
size, colour order, mean/std, output kind) and ``dilseg_input`` (``frame``: BGR uint8 N x H x W x
3, any size, the server preprocesses; ``tensor``: the model's normalised NCHW input), so a client
learns everything from the server. Torch-free.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from dilseg.runtime.artifact import ONNX_SUFFIX, artifact_suffix, is_engine, read_meta, read_sidecar
from dilseg.runtime.errors import DilsegError
from dilseg.runtime.metadata import METADATA_KEY, MetadataError, ModelMeta

PLATFORMS = ("onnxruntime_onnx", "tensorrt_plan", "python")
INPUT_PARAM = "dilseg_input"  # "frame" or "tensor"
THREADS_PARAM = {"python": "intra_op_threads", "onnxruntime_onnx": "intra_op_thread_count"}
FRAME_INPUT, LABELS_OUTPUT = "FRAME", "labels"  # the Python-backend model's tensors
MODEL_FILE = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan", "python": "model.py"}
PYTHON_MODEL_SOURCE = Path(__file__).with_name("triton_python_model.py")

# ONNX element types and TensorRT engine dtypes (as the sidecar spells them) -> Triton's.
_ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 6: "TYPE_INT32", 7: "TYPE_INT64", 2: "TYPE_UINT8", 3: "TYPE_INT8"}
_ENGINE_TYPES = {"float": "TYPE_FP32", "half": "TYPE_FP16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
                 "uint8": "TYPE_UINT8", "int8": "TYPE_INT8"}


class TritonRepoError(DilsegError, ValueError):
    """A repository cannot be written as asked, or a config.pbtxt is not a valid Triton config."""


def _pb2():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise TritonRepoError(f"writing a Triton repository needs tritonclient ({exc}); "
                              "pip install 'dilseg[triton]'") from None
    return model_config_pb2, text_format


@dataclass(frozen=True)
class RepoOptions:
    """How the model is served; the defaults suit a camera client per stream on one GPU."""

    platform: str = "onnxruntime_onnx"
    name: str | None = None  # default: the model's name from its metadata
    version: int = 1
    max_batch_size: int = 8  # 0: no batching (the graph's batch axis stays as it is)
    preferred_batch_sizes: tuple[int, ...] | None = None  # default: powers of two from 2 up to max_batch_size
    # How long a request waits for others when the model is idle. Requests that arrive while it is
    # busy queue and run together anyway, so no wait (Triton's own default) batches streams
    # without taxing one alone: a wait only helps clients that send in lockstep to an idle model,
    # and costs every request of a single stream the whole wait (0.1 ms of 100 us measured).
    queue_delay_us: int = 0
    instances: int = 1
    kind: str | None = None  # "cpu" or "gpu"; default: cpu for python, gpu otherwise
    threads: int = 0  # ONNX Runtime intra-op threads (python, onnxruntime_onnx); 0: the backend's default
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise TritonRepoError(f"--platform {self.platform}: choose one of {', '.join(PLATFORMS)}")
        for flag, value, low in (("--version", self.version, 1), ("--max-batch-size", self.max_batch_size, 0),
                                 ("--queue-delay-us", self.queue_delay_us, 0), ("--instances", self.instances, 1),
                                 ("--threads", self.threads, 0)):
            if not isinstance(value, int) or value < low:
                raise TritonRepoError(f"{flag} {value}: must be a whole number >= {low}")
        if self.kind not in (None, "cpu", "gpu"):
            raise TritonRepoError(f"--kind {self.kind}: cpu or gpu")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            raise TritonRepoError(f"--name {self.name!r}: a model name is a plain folder name")
        for b in self.preferred_batch_sizes or ():
            if not 1 <= b <= self.max_batch_size:
                raise TritonRepoError(f"--preferred-batch-size {b}: must be within 1..--max-batch-size "
                                      f"({self.max_batch_size})")

    @property
    def preferred(self) -> tuple[int, ...]:
        if self.preferred_batch_sizes is not None:
            return tuple(sorted(set(self.preferred_batch_sizes)))
        sizes, b = [], 2
        while b <= self.max_batch_size:
            sizes.append(b)
            b *= 2
        return tuple(sizes) or ((self.max_batch_size,) if self.max_batch_size else ())

    @property
    def instance_kind(self) -> str:
        return self.kind or ("cpu" if self.platform == "python" else "gpu")


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton's TYPE_*
    dims: tuple[int, ...]  # without the batch axis when batching; -1 for a dynamic axis


def _onnx_io(proto) -> tuple[list[Tensor], list[Tensor]]:
    def tensors(values) -> list[Tensor]:
        out = []
        for v in values:
            t = v.type.tensor_type
            if t.elem_type not in _ONNX_TYPES:
                raise TritonRepoError(f"ONNX tensor {v.name!r} has element type {t.elem_type}, which Triton's "
                                      "config cannot name here")
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim)
            out.append(Tensor(v.name, _ONNX_TYPES[t.elem_type], dims))
        return out

    return tensors(proto.graph.input), tensors(proto.graph.output)


def _engine_io(side: dict) -> tuple[list[Tensor], list[Tensor], int]:
    """The engine's I/O from its sidecar and the largest batch its profile allows."""
    io = side.get("io") or []
    if not io:
        raise TritonRepoError("the engine's sidecar records no I/O tensors; rebuild it with `dilseg build`")
    ins, outs = [], []
    for t in io:
        dtype = _ENGINE_TYPES.get(t["dtype"])
        if dtype is None:
            raise TritonRepoError(f"engine tensor {t['name']!r} has dtype {t['dtype']}, which Triton's config cannot "
                                  "name here")
        (ins if t["mode"] == "input" else outs).append(Tensor(t["name"], dtype, tuple(int(d) for d in t["shape"])))
    profile = side.get("profile") or {}
    max_batch = int(profile["max"][0]) if profile.get("max") and ins and ins[0].dims[0] == -1 else 0
    return ins, outs, max_batch


def _unbatched(tensors: list[Tensor]) -> list[Tensor]:
    return [replace(t, dims=t.dims[1:]) for t in tensors]


def build_config(name: str, meta: ModelMeta, options: RepoOptions, inputs: list[Tensor], outputs: list[Tensor],
                 frame_input: bool):
    """The ModelConfig message (Triton's schema). ``inputs``/``outputs`` exclude the batch axis
    when ``options.max_batch_size`` > 0."""
    pb, _ = _pb2()
    cfg = pb.ModelConfig(name=name, max_batch_size=options.max_batch_size)
    if options.platform == "python":
        cfg.backend = "python"
    else:
        cfg.platform = options.platform
        cfg.default_model_filename = MODEL_FILE[options.platform]
    for t in inputs:
        cfg.input.add(name=t.name, data_type=pb.DataType.Value(t.dtype), dims=list(t.dims))
    for t in outputs:
        cfg.output.add(name=t.name, data_type=pb.DataType.Value(t.dtype), dims=list(t.dims))
    if options.max_batch_size > 0:
        cfg.dynamic_batching.SetInParent()  # present even where every field keeps its default
        cfg.dynamic_batching.preferred_batch_size.extend(options.preferred)
        cfg.dynamic_batching.max_queue_delay_microseconds = options.queue_delay_us
    kind = pb.ModelInstanceGroup.KIND_CPU if options.instance_kind == "cpu" else pb.ModelInstanceGroup.KIND_GPU
    cfg.instance_group.add(kind=kind, count=options.instances)
    cfg.parameters[METADATA_KEY].string_value = meta.to_json()
    cfg.parameters[INPUT_PARAM].string_value = "frame" if frame_input else "tensor"
    if options.platform in THREADS_PARAM and options.threads:
        cfg.parameters[THREADS_PARAM[options.platform]].string_value = str(options.threads)
    return cfg


def check_config(text: str, where: str | Path = "config.pbtxt", folder_name: str | None = None):
    """Parse ``text`` with protobuf's text_format into Triton's ModelConfig and check what Triton
    would refuse at load time (and what a dilseg client needs). Returns the message; raises
    TritonRepoError naming the file and the problem."""
    pb, text_format = _pb2()
    cfg = pb.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as exc:
        raise TritonRepoError(f"{where}: not a valid Triton model config: {exc}") from None

    def bad(problem: str) -> TritonRepoError:
        return TritonRepoError(f"{where}: {problem}")

    if not cfg.name:
        raise bad("no model name")
    if folder_name is not None and cfg.name != folder_name:
        raise bad(f"name {cfg.name!r} differs from its folder {folder_name!r} (Triton refuses that)")
    if bool(cfg.platform) == bool(cfg.backend) and not (cfg.platform and cfg.backend):
        raise bad("needs a platform (onnxruntime_onnx, tensorrt_plan) or a backend (python)")
    if cfg.platform and cfg.platform not in ("onnxruntime_onnx", "tensorrt_plan"):
        raise bad(f"platform {cfg.platform!r} is not one dilseg writes")
    if cfg.max_batch_size < 0:
        raise bad(f"max_batch_size {cfg.max_batch_size} is negative")
    if cfg.HasField("dynamic_batching"):
        if cfg.max_batch_size == 0:
            raise bad("dynamic_batching needs max_batch_size > 0")
        for b in cfg.dynamic_batching.preferred_batch_size:
            if not 1 <= b <= cfg.max_batch_size:
                raise bad(f"preferred_batch_size {b} is outside 1..max_batch_size ({cfg.max_batch_size})")
    for kind, tensors in (("input", cfg.input), ("output", cfg.output)):
        if not tensors:
            raise bad(f"no {kind}")
        for t in tensors:
            if not t.name:
                raise bad(f"an {kind} without a name")
            if t.data_type == pb.TYPE_INVALID:
                raise bad(f"{kind} {t.name!r} has no data_type")
            if not t.dims or any(d == 0 or d < -1 for d in t.dims):
                raise bad(f"{kind} {t.name!r} has dims {list(t.dims)} (each > 0, or -1 for a dynamic axis)")
    for group in cfg.instance_group:
        if group.count < 1:
            raise bad(f"instance_group count {group.count} must be >= 1")
    if METADATA_KEY not in cfg.parameters:
        raise bad(f"parameters lack {METADATA_KEY!r}: a dilseg client cannot learn classes and normalisation")
    try:
        ModelMeta.from_json(cfg.parameters[METADATA_KEY].string_value)
    except MetadataError as exc:
        raise bad(f"parameter {METADATA_KEY!r}: {exc}") from None
    if INPUT_PARAM not in cfg.parameters or cfg.parameters[INPUT_PARAM].string_value not in ("frame", "tensor"):
        raise bad(f"parameter {INPUT_PARAM!r} must be 'frame' or 'tensor'")
    return cfg


def plan_script(name: str, version: int, onnx_input: Tensor, max_batch_size: int, preferred: tuple[int, ...],
                precision: str) -> str:
    """build_plan.sh: trtexec on the serving GPU turns model.onnx into VERSION/model.plan."""
    shape = "x".join(str(d) for d in onnx_input.dims[1:])
    batch = max(max_batch_size, 1)
    opt = max([b for b in preferred if b <= batch] or [batch])
    shapes = (f" \\\n  --minShapes={onnx_input.name}:1x{shape} --optShapes={onnx_input.name}:{opt}x{shape}"
              f" \\\n  --maxShapes={onnx_input.name}:{batch}x{shape}") if max_batch_size > 0 else ""
    # fp16 and int8-QDQ graphs state their precision themselves; strong typing keeps TensorRT 10 to it.
    typed = " \\\n  --stronglyTyped" if precision in ("fp16", "int8") else ""
    return f"""#!/usr/bin/env bash
# Builds {version}/model.plan for Triton's TensorRT backend from model.onnx, on the GPU that
# serves it: an engine only runs on the TensorRT version and GPU it was built with. Run it with
# the TensorRT of the Triton server that will load it, e.g. inside the same container image:
#   docker run --rm --gpus all -v "$PWD/{name}:/m" nvcr.io/nvidia/tritonserver:<yy.mm>-py3 /m/build_plan.sh
# (trtexec is /usr/src/tensorrt/bin/trtexec there), or with dilseg on that machine:
#   dilseg build {name}/model.onnx -o {name}/{version}/model.plan{' --min 1x' + shape + ' --opt ' + str(opt) + 'x' + shape + ' --max ' + str(batch) + 'x' + shape if max_batch_size > 0 else ''}
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
trtexec="$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)"
mkdir -p "$here/{version}"
"$trtexec" --onnx="$here/model.onnx" --saveEngine="$here/{version}/model.plan.part"{shapes}{typed}
mv "$here/{version}/model.plan.part" "$here/{version}/model.plan"
echo "built $here/{version}/model.plan; (re)load the model: tritonserver loads it at start, or POST /v2/repository/models/{name}/load"
"""


@dataclass
class Written:
    folder: Path  # REPO/NAME
    config: object  # the parsed ModelConfig
    notes: list[str]


def _prepare_onnx(artifact: Path, options: RepoOptions):
    """(the ONNX proto to serve, its I/O, notes): with a dynamic batch axis when batching."""
    import onnx

    from .onnx_batch import BatchAxisError, batch_dim, with_dynamic_batch

    notes: list[str] = []
    if options.max_batch_size > 0:
        try:
            proto, freed = with_dynamic_batch(artifact)
        except BatchAxisError as exc:
            raise TritonRepoError(f"{exc}; or serve it unbatched with --max-batch-size 0") from None
        if freed:
            notes.append("the batch axis was fixed at 1; it is dynamic in the served copy (checked: a batch of 2 "
                         "gives what each input gives alone)")
    else:
        proto = onnx.load(str(artifact))
        if batch_dim(proto) != 1:
            notes.append("the graph's batch axis is dynamic; with --max-batch-size 0 clients send batches of 1")
    ins, outs = _onnx_io(proto)
    if len(ins) != 1 or len(ins[0].dims) != 4:
        raise TritonRepoError(f"{artifact}: expected one NCHW image input, found {[(t.name, t.dims) for t in ins]}")
    return proto, ins, outs, notes


def export_triton(artifact: str | Path, repo: str | Path, options: RepoOptions = RepoOptions()) -> Written:
    """Write REPO/NAME for ``artifact`` (a dilseg .onnx, or a TensorRT .engine/.plan with its sidecar
    for --platform tensorrt_plan) and return what was written. Refuses to replace an existing
    REPO/NAME unless ``options.overwrite``."""
    artifact, repo = Path(artifact), Path(repo)
    if not artifact.is_file():
        raise TritonRepoError(f"{artifact}: no such file; pass a dilseg .onnx (or an .engine for tensorrt_plan)")
    suffix = artifact_suffix(artifact)
    engine = is_engine(artifact)
    if engine and options.platform != "tensorrt_plan":
        raise TritonRepoError(f"{artifact}: an engine is served with --platform tensorrt_plan, not {options.platform}")
    if not engine and suffix != ONNX_SUFFIX:
        raise TritonRepoError(f"{artifact}: not a dilseg .onnx or .engine/.plan")
    meta = read_meta(artifact)
    name = options.name or meta.model
    if repo.exists() and not repo.is_dir():
        raise TritonRepoError(f"-o {repo}: exists and is not a folder")
    target = repo / name
    if target.exists() and not options.overwrite:
        raise TritonRepoError(f"{target} already exists; pass --overwrite to replace that model (other models in "
                              f"{repo} are left alone) or --name to add another")
    pb, text_format = _pb2()
    notes: list[str] = []
    frame_input = options.platform == "python"
    served_meta = meta
    files: dict[str, bytes | Path] = {}  # relative path -> content or file to copy
    version = str(options.version)
    if engine:
        side = read_sidecar(artifact)
        ins, outs, engine_max = _engine_io(side)
        if options.max_batch_size > engine_max:
            raise TritonRepoError(
                f"{artifact}: the engine's profile allows batches up to {engine_max or 'a fixed 1'}, so "
                f"--max-batch-size {options.max_batch_size} cannot be served; pass --max-batch-size {engine_max} or "
                "build the engine with a batch profile (dilseg build --min 1x... --max 8x...)")
        files[f"{version}/model.plan"] = artifact
        notes.append(f"the engine was built with TensorRT {side.get('tensorrt_version', '?')} for "
                     f"{side.get('gpu_name', '?')}: the server must have that TensorRT version and GPU")
    else:
        proto, ins, outs, notes = _prepare_onnx(artifact, options)
        onnx_bytes = proto.SerializeToString()
        if options.platform == "python":
            files[f"{version}/model.onnx"] = onnx_bytes
            files[f"{version}/model.py"] = PYTHON_MODEL_SOURCE
            height_width = tuple(meta.input_size) if meta.input_size else (-1, -1)
            # Unbatched (max_batch_size 0), dims carry the batch of one themselves, as the ONNX's do.
            batch = (-1,) if options.max_batch_size > 0 else (1,)
            ins = [Tensor(FRAME_INPUT, "TYPE_UINT8", (*batch, -1, -1, 3))]
            # uint8 labels where the classes fit: a quarter of the bytes back over the wire.
            outs = [Tensor(LABELS_OUTPUT, "TYPE_UINT8" if meta.num_classes <= 256 else "TYPE_INT32",
                           (*batch, *height_width))]
            served_meta = replace(meta, output_kind="labels")  # the model reduces logits to labels
        elif options.platform == "onnxruntime_onnx":
            files[f"{version}/model.onnx"] = onnx_bytes
        else:
            files["model.onnx"] = onnx_bytes
            files["build_plan.sh"] = plan_script(name, options.version, ins[0], options.max_batch_size,
                                                 options.preferred, meta.precision).encode()
            notes.append(f"build {name}/{version}/model.plan on the serving GPU before loading: run {name}/build_plan.sh "
                         "with the server's TensorRT")
    if options.max_batch_size > 0:
        ins, outs = _unbatched(ins), _unbatched(outs)
    cfg = build_config(name, served_meta, options, ins, outs, frame_input)
    text = text_format.MessageToString(cfg)
    check_config(text, target / "config.pbtxt", folder_name=name)
    files["config.pbtxt"] = text.encode()

    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=repo.parent if str(repo.parent) else "."))
    try:
        for rel, content in files.items():
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, dest)
            else:
                dest.write_bytes(content)
        if (staging / "build_plan.sh").exists():
            os.chmod(staging / "build_plan.sh", 0o755)
        os.chmod(staging, 0o755)
        # Parse what landed on disk, as Triton will.
        check_config((staging / "config.pbtxt").read_text(), target / "config.pbtxt", folder_name=name)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=staging.parent))
            os.replace(target, old / name)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:  # full disk, permissions: nothing of REPO/NAME changed
        shutil.rmtree(staging, ignore_errors=True)
        raise TritonRepoError(f"{target}: cannot write it: {exc.strerror or exc}; nothing was written") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Written(target, cfg, notes)


def describe(written: Written) -> str:
    """One paragraph for people: what was written and how to serve it."""
    pb, _ = _pb2()
    cfg = written.config
    kind = cfg.platform or f"{cfg.backend} backend"
    batching = (f"dynamic batching up to {cfg.max_batch_size} (preferred {list(cfg.dynamic_batching.preferred_batch_size)},"
                f" queue delay {cfg.dynamic_batching.max_queue_delay_microseconds} us)") if cfg.max_batch_size else \
        "no batching"
    meta = json.loads(cfg.parameters[METADATA_KEY].string_value)
    lines = [f"wrote {written.folder}: {kind}, {batching}, {cfg.instance_group[0].count} "
             f"{pb.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind)[5:]} instance(s), {len(meta['classes'])} classes, "
             f"input {cfg.parameters[INPUT_PARAM].string_value}"]
    lines += [f"note: {n}" for n in written.notes]
    repo = written.folder.parent
    lines.append(f"serve: tritonserver --model-repository={repo}   then: dilseg run --model "
                 f"triton://127.0.0.1:8001/{cfg.name} --source 0 --show")
    return "\n".join(lines)
