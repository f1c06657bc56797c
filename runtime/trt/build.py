"""ONNX -> TensorRT engine, on TensorRT 10.x (incl. 10.3 on JetPack 6) and 11.x.

Everything that can be checked without TensorRT (the file, its metadata, its precision
flavour, the shape profile, the options) is checked first, so a bad request fails fast
with a clear message on any machine. Only then is ``tensorrt`` imported (never at module
import) and every version-dependent call taken from ``compat``.

Builds happen on the device that will run the engine: `dilseg build`, or the engine cache
(``loaders.EngineFromOnnx``) when an .onnx is run on TensorRT.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ..artifact import ENGINE_SUFFIXES, is_engine, session_meta
from ..defaults import TRT_WORKSPACE_MIB
from ..errors import DilsegError, os_errors_as
from ..files import atomic_write_bytes, sha256_file
from ..metadata import MetadataError, ModelMeta
from .cache import CacheKey, make_sidecar, write_engine
from .compat import BuildPlan, Capabilities, TrtCompatError, check_supported, detect, plan_build
from .cuda import Gpu, query_gpu
from .deps import import_tensorrt, make_logger

# Used for a dynamic ONNX when no --min/--opt/--max is given: CamVid's 360x480 as the shape
# TensorRT tunes for, from a 256x320 thumbnail up to 720p.
DEFAULT_DYNAMIC_PROFILE = ("1x3x256x320", "1x3x360x480", "1x3x720x1280")
# Used for an ONNX whose only free axis is the batch (`dilseg export onnx --batch dynamic`):
# one to eight frames per inference (several streams batched), tuned for four.
DEFAULT_BATCH_PROFILE = (1, 4, 8)
OUTPUT_STRIDE = 8  # the models' output stride: H and W must be multiples of it
# Label maps the runner and its GPU renderer read (one colour kernel per type); the builder
# refuses any other label output, so an engine it writes is one the backend opens.
LABEL_DTYPES = ("int32", "uint8")


class BuildError(DilsegError, ValueError):
    """An engine cannot be built from these inputs; the message says what to change."""


# -- shape profiles ----------------------------------------------------------------------------

_SHAPE_RE = re.compile(r"^\s*(?:(?P<name>[^:\s]+)\s*:)?\s*(?P<dims>\d+(?:\s*[xX,]\s*\d+)*)\s*$")


def parse_shape(text: str, flag: str = "--shape") -> tuple[str | None, tuple[int, ...]]:
    """'1x3x256x320' or 'input:1x3x256x320' -> (name or None, (1, 3, 256, 320))."""
    m = _SHAPE_RE.match(str(text))
    if not m:
        raise BuildError(f"{flag} {text!r}: expected NxCxHxW such as 1x3x256x320, optionally prefixed with the "
                         "input name (input:1x3x256x320)")
    dims = tuple(int(v) for v in re.split(r"\s*[xX,]\s*", m.group("dims")))
    return m.group("name"), dims


@dataclass(frozen=True)
class ShapeProfile:
    input: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @property
    def fixed(self) -> bool:
        return self.min == self.opt == self.max

    def to_dict(self) -> dict:
        return {"input": self.input, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    def __str__(self) -> str:
        f = lambda s: "x".join(map(str, s))  # noqa: E731
        return f"{self.input}: {f(self.min)}" if self.fixed else \
            f"{self.input}: min {f(self.min)}, opt {f(self.opt)}, max {f(self.max)}"


def resolve_profile(input_name: str, input_dims: list, min_s: str | None = None, opt_s: str | None = None,
                    max_s: str | None = None) -> tuple[ShapeProfile, bool]:
    """The optimisation profile for the ONNX input (``input_dims``: ints for fixed axes, None
    or a name for dynamic ones). Returns (profile, used_default)."""
    dynamic = [i for i, d in enumerate(input_dims) if not isinstance(d, int) or d <= 0]
    given = {k: v for k, v in (("--min", min_s), ("--opt", opt_s), ("--max", max_s)) if v}
    if len(input_dims) != 4:
        raise BuildError(f"the ONNX input {input_name!r} has rank {len(input_dims)}; dilseg models take one NCHW image")
    if not dynamic:
        fixed = tuple(int(d) for d in input_dims)
        for flag, text in given.items():
            name, dims = parse_shape(text, flag)
            _check_name(name, input_name, flag)
            if dims != fixed:
                raise BuildError(f"{flag} {text}: this ONNX has a fixed input {'x'.join(map(str, fixed))}, so shapes "
                                 "cannot be chosen; export a dynamic ONNX (`dilseg export onnx --dynamic`) to build "
                                 "an engine for other sizes, or free its batch axis (`dilseg export onnx --from "
                                 "MODEL.onnx --batch dynamic`) to batch several streams")
        return ShapeProfile(input_name, fixed, fixed, fixed), False
    used_default = False
    if not given:
        min_s, opt_s, max_s = DEFAULT_DYNAMIC_PROFILE
        if dynamic == [0]:
            fixed = "x".join(str(int(d)) for d in input_dims[1:])
            min_s, opt_s, max_s = (f"{b}x{fixed}" for b in DEFAULT_BATCH_PROFILE)
        used_default = True
    elif len(given) == 1 and "--opt" not in given:
        raise BuildError(f"{next(iter(given))} alone is not a profile: give --min, --opt and --max "
                         "(or only --opt for a single fixed size)")
    parsed = {}
    for flag, text in (("--min", min_s), ("--opt", opt_s), ("--max", max_s)):
        if text:
            name, dims = parse_shape(text, flag)
            _check_name(name, input_name, flag)
            parsed[flag] = dims
    # Only --opt: build for exactly that size. Two of three: the missing one is refused.
    if set(parsed) == {"--opt"}:
        parsed["--min"] = parsed["--max"] = parsed["--opt"]
    missing = [f for f in ("--min", "--opt", "--max") if f not in parsed]
    if missing:
        raise BuildError(f"a dynamic ONNX needs --min, --opt and --max together; missing {', '.join(missing)}")
    lo, opt, hi = parsed["--min"], parsed["--opt"], parsed["--max"]
    for flag, dims in parsed.items():
        if len(dims) != 4:
            raise BuildError(f"{flag} {'x'.join(map(str, dims))}: expected 4 dimensions NxCxHxW, got {len(dims)}")
        if any(d <= 0 for d in dims):
            raise BuildError(f"{flag} {'x'.join(map(str, dims))}: every dimension must be positive")
        for axis, d in enumerate(input_dims):
            if isinstance(d, int) and d > 0 and dims[axis] != d:
                raise BuildError(f"{flag} {'x'.join(map(str, dims))}: axis {axis} of the ONNX input is fixed at {d}")
        if dims[1] != 3:
            raise BuildError(f"{flag} {'x'.join(map(str, dims))}: the image has 3 channels (NxCxHxW with C=3)")
        if dims[2] % OUTPUT_STRIDE or dims[3] % OUTPUT_STRIDE:
            raise BuildError(f"{flag} {'x'.join(map(str, dims))}: height and width must be multiples of "
                             f"{OUTPUT_STRIDE} (the output stride)")
    for axis in range(4):
        if not lo[axis] <= opt[axis] <= hi[axis]:
            raise BuildError(f"shape profile out of order on axis {axis}: need min <= opt <= max, got "
                             f"{lo[axis]} / {opt[axis]} / {hi[axis]}")
    return ShapeProfile(input_name, lo, opt, hi), used_default


def _check_name(name: str | None, input_name: str, flag: str) -> None:
    if name is not None and name != input_name:
        raise BuildError(f"{flag}: the ONNX has no input named {name!r}; its input is {input_name!r}")


# -- what is being built ----------------------------------------------------------------------

@dataclass
class OnnxInfo:
    path: Path
    meta: ModelMeta
    input_name: str
    input_dims: list  # ints, or None/str for dynamic axes
    sha256: str


def inspect_onnx(path: str | Path) -> OnnxInfo:
    """Metadata and input of a dilseg ONNX, read with ONNX Runtime (every install has it)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.exists():
        raise BuildError(f"{path}: no such file")
    if path.is_dir():
        raise BuildError(f"{path}: is a folder, not an ONNX file")
    if is_engine(path):
        raise BuildError(f"{path}: this is already a TensorRT engine; `dilseg build` takes the ONNX it came from")
    with os_errors_as(BuildError, path, "read it"), open(path, "rb") as f:
        head = f.read(64)
    if not head or head.lstrip()[:1] in (b"{", b"<") or head.startswith(b"\x89PNG") or head.startswith(b"PK"):
        raise BuildError(f"{path}: not an ONNX model (export one with `dilseg export onnx`)")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime's own Fail/InvalidProtobuf types
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise BuildError(f"{path}: not an ONNX model, or a damaged one ({first})") from None
    try:
        meta = session_meta(path, sess)
    except MetadataError as exc:
        raise BuildError(str(exc)) from None
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise BuildError(f"{path}: expected one image input, found {len(inputs)} ({', '.join(i.name for i in inputs)})")
    return OnnxInfo(path, meta, inputs[0].name, list(inputs[0].shape), sha256_file(path))


def tensorrt_refusal(info: OnnxInfo) -> str | None:
    """Why TensorRT must not build this ONNX, or None.

    TensorRT parses only symmetric INT8 Q/DQ (zero point 0). The 'cpu' int8 flavour (uint8
    activations, non-zero zero points, for ONNX Runtime's x86 kernels) would fail deep in the
    parser or, worse, be misread, so it is refused by its metadata and, where the ``onnx``
    package is installed, by its graph.
    """
    meta = info.meta
    target = meta.extra.get("int8_target")
    fix = "re-export it for TensorRT with `dilseg export onnx --precision int8 --target tensorrt ...`"
    if target == "cpu":
        return (f"{info.path}: this int8 ONNX is the 'cpu' flavour (uint8 activations with non-zero zero points "
                f"for ONNX Runtime); TensorRT accepts only symmetric int8 Q/DQ (zero point 0): {fix}, or run "
                "this one with --backend onnxruntime")
    if meta.precision != "int8" and target is None:
        return None
    bad = asymmetric_qdq(info.path)
    if bad:
        return (f"{info.path}: its QuantizeLinear/DequantizeLinear nodes use {bad}; TensorRT accepts only "
                f"symmetric int8 Q/DQ (zero point 0): {fix}")
    return None


def asymmetric_qdq(path: Path) -> str | None:
    """'uint8 zero points' / 'non-zero zero points' if the graph has such Q/DQ nodes, else None
    (also None when the ``onnx`` package is missing: the metadata check stands alone then)."""
    try:
        import numpy as np
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3 or not node.input[2]:
            continue
        zp = node.input[2]
        if zp in inits:
            arr = numpy_helper.to_array(inits[zp])
        elif zp in consts:
            arr = numpy_helper.to_array(consts[zp].attribute[0].t)
        else:
            continue
        if arr.dtype == np.uint8:
            return "uint8 zero points (asymmetric uint8 activations)"
        if np.any(arr != 0):
            return "non-zero zero points"
    return None


@dataclass(frozen=True)
class BuildOptions:
    """How an engine is built (`dilseg build`'s options)."""

    fp16: bool = False
    min_shape: str | None = None
    opt_shape: str | None = None
    max_shape: str | None = None
    workspace_mib: int = TRT_WORKSPACE_MIB
    timing_cache: str | None = None
    dla_core: int | None = None
    hardware_compatible: bool = False
    version_compatible: bool = False
    progress: bool = True
    device: int = 0

    def recorded(self) -> dict:
        """The options worth keeping in the sidecar."""
        d = asdict(self)
        d.pop("progress")
        return d


@dataclass
class Prepared:
    """A validated request: what to build and for which shapes."""

    info: OnnxInfo
    profile: ShapeProfile
    default_profile: bool
    options: BuildOptions
    notes: list[str] = field(default_factory=list)


def prepare(onnx_path: str | Path, engine_path: str | Path | None, options: BuildOptions) -> Prepared:
    """Every check that needs no TensorRT and no GPU."""
    if options.workspace_mib is None or options.workspace_mib <= 0:
        raise BuildError(f"--workspace must be a positive number of MiB, got {options.workspace_mib}")
    if options.dla_core is not None and options.dla_core < 0:
        raise BuildError(f"--dla-core must be 0 or more, got {options.dla_core}")
    if engine_path is not None:
        engine_path = Path(engine_path)
        if not is_engine(engine_path):
            raise BuildError(f"-o {engine_path}: the output must end in {' or '.join(ENGINE_SUFFIXES)} (its sidecar "
                             f"is {engine_path.name}.json)")
        parent = engine_path.parent if str(engine_path.parent) else Path(".")
        if not parent.is_dir():
            raise BuildError(f"-o {engine_path}: folder {parent} does not exist")
        if engine_path.is_dir():
            raise BuildError(f"-o {engine_path}: is a folder")
    if options.timing_cache:
        tc = Path(options.timing_cache)
        if tc.is_dir():
            raise BuildError(f"--timing-cache {tc}: is a folder; give a file (it is created if missing)")
        if not (tc.parent if str(tc.parent) else Path(".")).is_dir():
            raise BuildError(f"--timing-cache {tc}: folder {tc.parent} does not exist")
    info = inspect_onnx(onnx_path)
    refusal = tensorrt_refusal(info)
    if refusal:
        raise BuildError(refusal)
    if info.meta.precision not in ("fp32", "fp16", "int8"):
        raise BuildError(f"{info.path}: unknown precision {info.meta.precision!r} in its metadata")
    if options.fp16 and info.meta.precision != "fp32":
        raise BuildError(f"--fp16 applies to an fp32 ONNX only; {info.path.name} is already {info.meta.precision} "
                         "(its precision is built into the graph): drop --fp16")
    profile, default = resolve_profile(info.input_name, info.input_dims, options.min_shape, options.opt_shape,
                                       options.max_shape)
    notes = [f"dynamic ONNX without --min/--opt/--max: using the default profile {profile}"] if default else []
    return Prepared(info, profile, default, options, notes)


# -- TensorRT ----------------------------------------------------------------------------------

class PhaseBars:
    """tqdm bars for TensorRT's nested build phases (thread-safe: TensorRT reports from its own threads)."""

    def __init__(self, enabled: bool = True, file=None) -> None:
        self.enabled, self.file = enabled, file
        self.bars: dict[str, Any] = {}
        self.depth: dict[str, int] = {}
        self.cancel = False
        self.lock = threading.Lock()

    def start(self, phase: str, parent: str | None, steps: int) -> None:
        from tqdm import tqdm

        with self.lock:
            depth = self.depth.get(parent, -1) + 1 if parent else 0
            self.depth[phase] = depth
            if self.enabled:
                self.bars[phase] = tqdm(total=max(int(steps), 1), desc=("  " * depth) + phase, position=depth,
                                        leave=depth == 0, file=self.file, dynamic_ncols=True)

    def step(self, phase: str, step: int) -> bool:
        """Step ``step`` (0-based) of ``phase`` is done; False asks TensorRT to cancel."""
        with self.lock:
            bar = self.bars.get(phase)
            if bar is not None:
                bar.n = min(int(step) + 1, bar.total)
                bar.refresh()
            return not self.cancel

    def finish(self, phase: str) -> None:
        with self.lock:
            bar = self.bars.pop(phase, None)
            self.depth.pop(phase, None)
            if bar is not None:
                bar.close()

    def close(self) -> None:
        with self.lock:
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()


def make_progress_monitor(trt, bars: PhaseBars):
    """A tensorrt.IProgressMonitor feeding ``bars`` (the class needs the module, hence a factory)."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            bars.start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            try:
                return bars.step(phase_name, step)
            except KeyboardInterrupt:
                bars.cancel = True
                return False

        def phase_finish(self, phase_name):
            bars.finish(phase_name)

    return _Monitor()


def plan_for(caps: Capabilities, prepared: Prepared, compute_capability: tuple[int, int] | None) -> BuildPlan:
    o = prepared.options
    try:
        return plan_build(caps, prepared.info.meta.precision, fp16=o.fp16, dla_core=o.dla_core,
                          hardware_compatible=o.hardware_compatible, version_compatible=o.version_compatible,
                          compute_capability=compute_capability)
    except TrtCompatError as exc:
        raise BuildError(str(exc)) from None


def expected_key(prepared: Prepared, trt_version: str, gpu: Gpu, precision: str) -> CacheKey:
    """The cache key of the engine this request builds on ``gpu``."""
    cc, o = gpu.compute_capability, prepared.options
    return CacheKey(prepared.info.sha256, str(trt_version), gpu.name, f"{cc[0]}.{cc[1]}", precision,
                    prepared.profile.to_dict(), o.dla_core, o.hardware_compatible, o.version_compatible)


@dataclass
class BuildResult:
    engine_path: Path
    sidecar: dict
    seconds: float
    plan: BuildPlan
    notes: list[str]


def build_engine(onnx_path: str | Path, engine_path: str | Path, options: BuildOptions | None = None,
                 log: Callable[[str], None] = print, prepared: Prepared | None = None) -> BuildResult:
    """Validate, build, and write ``engine_path`` plus its sidecar (both atomically).

    Runs in the calling thread, which must be the one that owns the CUDA context when called
    from the runtime (TensorRT uses the current context).
    """
    options = options or BuildOptions()
    prepared = prepared or prepare(onnx_path, engine_path, options)
    engine_path = Path(engine_path)
    trt = import_tensorrt(BuildError, "building an engine")
    caps = detect(trt)
    try:
        check_supported(caps)
    except TrtCompatError as exc:
        raise BuildError(str(exc)) from None
    gpu = query_gpu(options.device, BuildError)
    plan = plan_for(caps, prepared, gpu.compute_capability)
    notes = list(prepared.notes) + list(plan.notes)
    for note in notes:
        log(f"note: {note}")

    logger = make_logger(trt)
    builder = trt.Builder(logger)
    if options.dla_core is not None:
        cores = int(getattr(builder, "num_DLA_cores", 0))
        if options.dla_core >= cores:
            raise BuildError(f"--dla-core {options.dla_core}: this device has {cores} DLA core(s)"
                             + (" (DLA exists on Jetson AGX/NX Orin and Xavier modules)" if cores == 0 else
                                f"; use 0..{cores - 1}"))
    net_flags = 0
    for name in plan.network_flags:
        net_flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(prepared.info.path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        raise BuildError(f"{prepared.info.path}: TensorRT {caps.version} cannot parse this ONNX: "
                         + " | ".join(e.strip() for e in errors[:5]))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mib) << 20)
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if plan.hardware_compatibility_level:
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, plan.hardware_compatibility_level)
    if options.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(options.dla_core)

    p = prepared.profile
    profile = builder.create_optimization_profile()
    profile.set_shape(p.input, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)

    cache_path = Path(options.timing_cache) if options.timing_cache else None
    timing_cache, write_cache = None, False  # the attached cache must outlive the build: held here
    if cache_path:
        with os_errors_as(BuildError, cache_path, "read the timing cache"):
            cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
        seen, accepted = len(logger.errors), False
        try:
            timing_cache = config.create_timing_cache(cache_bytes)
            # ignore_mismatch=False: a cache from another TensorRT or GPU is refused, not merged in.
            accepted = timing_cache is not None and bool(config.set_timing_cache(timing_cache, False))
        except (RuntimeError, TypeError, ValueError):  # pybind11's translations of TensorRT's refusals
            pass
        write_cache, warning = timing_cache_plan(cache_path, bool(cache_bytes), accepted, str(caps.version),
                                                 " | ".join(logger.errors[seen:][:2]))
        if warning:
            log(f"warning: {warning}")

    bars = PhaseBars(enabled=options.progress)
    # TensorRT does not own the monitor: it must outlive the build, so it is held here.
    monitor = make_progress_monitor(trt, bars) if caps.progress_monitor and options.progress else None
    if monitor is not None:
        config.progress_monitor = monitor
    t0 = time.perf_counter()
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        bars.close()
    seconds = time.perf_counter() - t0
    if bars.cancel:
        raise BuildError("build cancelled; nothing was written")
    if serialized is None:
        raise BuildError(f"TensorRT {caps.version} failed to build the engine: "
                         + (" | ".join(logger.errors[-5:]) or "no error message (try a larger --workspace)"))
    engine_bytes = bytes(memoryview(serialized))

    io = engine_io(trt, logger, engine_bytes, host_code=options.version_compatible and caps.engine_host_code_allowed,
                   dla_core=options.dla_core)
    check_engine_io(io, prepared.info.meta)
    if write_cache:
        built_cache = config.get_timing_cache()  # None when TensorRT kept none
        data, problem = timing_cache_bytes(built_cache.serialize() if built_cache is not None else None, cache_path)
        if problem:
            log(f"warning: {problem}")
        else:
            atomic_write_bytes(cache_path, data)
    del timing_cache  # held until here: the build that used it is over
    # The engine's metadata tells what it computes in (an fp32 ONNX built with --fp16 is an fp16 model).
    meta = replace(prepared.info.meta, precision=plan.engine_precision)
    sidecar = make_sidecar(
        meta, tensorrt_version=str(caps.version), gpu_name=gpu.name,
        compute_capability="{}.{}".format(*gpu.compute_capability), precision=plan.engine_precision, profile=p.to_dict(),
        onnx_sha256=prepared.info.sha256, engine_sha256=hashlib.sha256(engine_bytes).hexdigest(),
        engine_size=len(engine_bytes), hardware_compatible=options.hardware_compatible,
        version_compatible=options.version_compatible, dla_core=options.dla_core, build_seconds=seconds, io=io,
        onnx_path=str(prepared.info.path), options={**options.recorded(), "typing": plan.typing,
                                                    "network_flags": list(plan.network_flags),
                                                    "builder_flags": list(plan.builder_flags),
                                                    "onnx_precision": prepared.info.meta.precision})
    write_engine(engine_path, engine_bytes, sidecar)
    return BuildResult(engine_path, sidecar, seconds, plan, notes)


def timing_cache_plan(path: Path, had_data: bool, accepted: bool, version: str,
                      reason: str = "") -> tuple[bool, str | None]:
    """What a build does with ``--timing-cache PATH`` once TensorRT answered ``set_timing_cache``:
    (write the build's cache back to PATH, warning to print). A cache TensorRT refuses (another
    TensorRT version or GPU, or damaged) is left as it is: it is the user's file, and may serve
    the TensorRT or GPU it came from."""
    why = f" ({reason})" if reason else ""
    if accepted:
        return True, None
    if had_data:
        return False, (f"--timing-cache {path}: TensorRT {version} did not accept it{why}; it was made by another "
                       f"TensorRT version or GPU, or is damaged. Building without it and leaving {path} as it is; "
                       "give another --timing-cache path (or delete this one) to keep a cache for this GPU")
    return False, (f"--timing-cache {path}: TensorRT {version} refused a new timing cache{why}; building without "
                   f"one, and {path} is not written")


def timing_cache_bytes(memory: Any, path: Path) -> tuple[bytes, str | None]:
    """The bytes of the build's serialized timing cache (None where ``get_timing_cache()`` gave
    none), or a warning saying why ``path`` is not written."""
    if memory is None:
        return b"", (f"--timing-cache {path}: TensorRT returned no timing cache after the build, so {path} is not "
                     "written (the engine is)")
    return bytes(memoryview(memory)), None


def engine_io(trt, logger, engine_bytes: bytes, host_code: bool = False, dla_core: int | None = None) -> list[dict]:
    """Names, modes, dtypes and shapes of the built engine's I/O tensors (recorded in the sidecar).
    Loading it back also proves the engine deserializes, as the backend will."""
    runtime = trt.Runtime(logger)
    if host_code:  # a version-compatible engine embeds its lean runtime
        runtime.engine_host_code_allowed = True
    if dla_core is not None:
        runtime.DLA_core = int(dla_core)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise BuildError("TensorRT built an engine it cannot load back: " + " | ".join(logger.errors[-3:]))
    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        io.append({"name": name,
                   "mode": "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output",
                   "dtype": str(engine.get_tensor_dtype(name)).split(".")[-1].lower(),
                   "shape": [int(d) for d in engine.get_tensor_shape(name)]})
    del engine, runtime
    return io


def check_engine_io(io: list[dict], meta: ModelMeta) -> None:
    """Only a label map (int32 / uint8) or logits may come out, as the metadata promises."""
    outs = [t for t in io if t["mode"] == "output"]
    ins = [t for t in io if t["mode"] == "input"]
    if len(ins) != 1 or not outs:
        raise BuildError(f"the engine has {len(ins)} input(s) and {len(outs)} output(s); expected one image in, labels out")
    out = outs[0]
    if meta.output_kind == "labels" and out["dtype"] not in LABEL_DTYPES:
        raise BuildError(f"the engine's output {out['name']!r} is {out['dtype']}, not {'/'.join(LABEL_DTYPES)} labels: "
                         "the ONNX should cast ArgMax to int32 (re-export with `dilseg export onnx`)")
