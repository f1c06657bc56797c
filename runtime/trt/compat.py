"""The one place that decides which TensorRT API a given TensorRT version offers.

Everything here is a pure function of a version string (plus, at run time, what the
imported module really exposes), so the gating is unit-tested without TensorRT.

Sources (NVIDIA documentation, checked with the project's search tool):
- Migration guide 10.x -> 11.x, "Removed Python APIs and Replacements" (11.0-11.4):
  BuilderFlag.FP16 / INT8 / FP8 / BF16 / OBEY|PREFER_PRECISION_CONSTRAINTS / DIRECT_IO,
  IBuilderConfig.int8_calibrator and the quantization-flag calls, Builder.platform_has_fast_fp16
  are gone; strongly typed networks are required (create_network() is strongly typed by default).
  The same guide: "JetPack is not supported in TensorRT 11.4.0".
- Python API reference, Builder page (10.x): NetworkDefinitionCreationFlag.EXPLICIT_BATCH is
  "ignored because networks are always explicit batch"; STRONGLY_TYPED exists in 10.x; weak typing
  was deprecated in 10.12 (NVIDIA's strong-typing migration notes), hence "reliable from 10.12".
- IProgressMonitor (tensorrt.IProgressMonitor, phase_start / step_complete / phase_finish) is
  documented from TensorRT 10.0 and still in 11.x (sample simple_progress_monitor).
- Version compatibility (BuilderFlag.VERSION_COMPATIBLE) and hardware compatibility
  (IBuilderConfig.hardware_compatibility_level = HardwareCompatibilityLevel.AMPERE_PLUS) exist
  from 8.6; a version-compatible engine runs on later TensorRT of the same major version and
  needs Runtime.engine_host_code_allowed = True; AMPERE_PLUS needs an Ampere or newer GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

# Absolute: this module is also loaded on its own, by file path, by tools that check the gates.
from dilseg.runtime.errors import DilsegError

MIN_SUPPORTED = (10, 0)
TESTED_MAJORS = (10, 11)
AMPERE = (8, 0)  # compute capability floor of HardwareCompatibilityLevel.AMPERE_PLUS


class TrtCompatError(DilsegError, ValueError):
    """The running TensorRT cannot do what was asked; the message says what to do instead."""


class TrtVersion(NamedTuple):
    major: int
    minor: int
    patch: int = 0

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def parse_version(text: str) -> TrtVersion:
    """'10.3.0.30' / '11.4.0' / '10.13.3.9.post1' -> TrtVersion(major, minor, patch)."""
    m = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if not m:
        raise TrtCompatError(f"cannot read a TensorRT version from {text!r}")
    return TrtVersion(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))


@dataclass(frozen=True)
class Capabilities:
    """What one TensorRT version offers, as plain facts (no TensorRT objects)."""

    version: TrtVersion
    weak_typing: bool  # BuilderFlag.FP16 / INT8 exist (10.x); gone in 11
    strongly_typed_flag: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED can be passed
    strongly_typed_reliable: bool  # strong typing is the recommended path (10.12+, always in 11)
    strongly_typed_always: bool  # every network is strongly typed (11+)
    progress_monitor: bool  # tensorrt.IProgressMonitor can be subclassed
    version_compatible: bool  # BuilderFlag.VERSION_COMPATIBLE
    hardware_compatible: bool  # IBuilderConfig.hardware_compatibility_level
    engine_host_code_allowed: bool  # Runtime.engine_host_code_allowed
    platform_has_fast_fp16: bool  # Builder.platform_has_fast_fp16 (deprecated 10.5, removed 11)
    dla: bool  # DeviceType.DLA / IBuilderConfig.DLA_core in the API (the device decides the rest)
    jetpack: bool  # NVIDIA ships this major version for JetPack
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tested(self) -> bool:
        return self.version.major in TESTED_MAJORS


def describe(version: str | TrtVersion) -> Capabilities:
    """The documented capabilities of a TensorRT version."""
    v = version if isinstance(version, TrtVersion) else parse_version(version)
    eleven = v.major >= 11
    notes: list[str] = []
    if v.major > max(TESTED_MAJORS):
        notes.append(f"TensorRT {v.major} is newer than dilseg was written for (10.x, 11.x); "
                     "it is treated like 11.x")
    return Capabilities(
        version=v,
        weak_typing=not eleven,
        strongly_typed_flag=v >= (9, 1),
        strongly_typed_reliable=eleven or v >= (10, 12),
        strongly_typed_always=eleven,
        progress_monitor=v >= (10, 0),
        version_compatible=v >= (8, 6),
        hardware_compatible=v >= (8, 6),
        engine_host_code_allowed=v >= (8, 6),
        platform_has_fast_fp16=not eleven,
        dla=True,
        jetpack=not eleven,
        notes=tuple(notes),
    )


def detect(trt: Any) -> Capabilities:
    """Capabilities of the imported ``tensorrt`` module: the documented ones, narrowed by what
    the module really exposes (a point release may drop an API the docs still list)."""
    caps = describe(getattr(trt, "__version__", "0.0"))
    flags = getattr(trt, "BuilderFlag", None)
    net_flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
    return replace(
        caps,
        weak_typing=caps.weak_typing and hasattr(flags, "FP16") and hasattr(flags, "INT8"),
        strongly_typed_flag=caps.strongly_typed_flag and hasattr(net_flags, "STRONGLY_TYPED"),
        progress_monitor=caps.progress_monitor and hasattr(trt, "IProgressMonitor"),
        version_compatible=caps.version_compatible and hasattr(flags, "VERSION_COMPATIBLE"),
        hardware_compatible=caps.hardware_compatible and hasattr(trt, "HardwareCompatibilityLevel"),
        dla=caps.dla and hasattr(getattr(trt, "DeviceType", None), "DLA"),
    )


def check_supported(caps: Capabilities) -> None:
    """Refuse TensorRT older than 10 (the name-based I/O API and execute_async_v3 are used)."""
    if caps.version < MIN_SUPPORTED:
        raise TrtCompatError(
            f"TensorRT {caps.version} is too old: dilseg needs TensorRT 10.x or 11.x "
            "(desktop: `pip install dilseg[trt]`; Jetson: JetPack 6 ships 10.3)")


# -- build plans ---------------------------------------------------------------------------

@dataclass(frozen=True)
class BuildPlan:
    """How to build: names of TensorRT enum members, resolved against the module by the builder."""

    network_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag members
    builder_flags: tuple[str, ...]  # BuilderFlag members
    hardware_compatibility_level: str | None  # HardwareCompatibilityLevel member
    engine_precision: str  # what the engine computes in: fp32 | fp16 | int8
    typing: str  # "strong" or "weak"
    notes: tuple[str, ...] = ()


ONNX_PRECISIONS = ("fp32", "fp16", "int8")


def plan_build(caps: Capabilities, onnx_precision: str, *, fp16: bool = False, dla_core: int | None = None,
               hardware_compatible: bool = False, version_compatible: bool = False,
               compute_capability: tuple[int, int] | None = None) -> BuildPlan:
    """Translate a request into version-correct flags, or refuse it with a reason.

    Precision comes from the ONNX graph: an fp16 ONNX (fp16 inside, fp32 I/O) or an int8 QDQ
    ONNX already says what to compute in. Only an fp32 ONNX can be lowered with ``fp16``, and
    only where weak typing still exists (TensorRT 10).
    """
    check_supported(caps)
    if onnx_precision not in ONNX_PRECISIONS:
        raise TrtCompatError(f"unknown ONNX precision {onnx_precision!r} (expected one of {', '.join(ONNX_PRECISIONS)})")
    notes: list[str] = list(caps.notes)
    net: list[str] = []
    flags: list[str] = []

    if fp16 and onnx_precision != "fp32":
        raise TrtCompatError(f"--fp16 applies to an fp32 ONNX only; this ONNX is already {onnx_precision} "
                             "(its precision is built into the graph): drop --fp16")
    if fp16 and not caps.weak_typing:
        raise TrtCompatError(
            f"TensorRT {caps.version} is strongly typed only: BuilderFlag.FP16 no longer exists, so --fp16 "
            "cannot lower an fp32 ONNX. Export an fp16 ONNX instead (fp32 I/O, fp16 inside) and build that")

    if onnx_precision == "fp32" and not fp16:
        # Weak typing on 10.x leaves an fp32 graph in fp32 (TF32 allowed, TensorRT's default);
        # on 11.x create_network(0) is strongly typed anyway.
        precision, typing = "fp32", "strong" if caps.strongly_typed_always else "weak"
    elif onnx_precision == "fp32" and fp16:
        precision, typing = "fp16", "weak"
        flags.append("FP16")
    elif caps.strongly_typed_always:
        precision, typing = onnx_precision, "strong"
    elif caps.strongly_typed_reliable and caps.strongly_typed_flag:
        precision, typing = onnx_precision, "strong"
        net.append("STRONGLY_TYPED")
    else:
        # Before 10.12 strong typing was young; weak typing with the precision flags lets the
        # builder honour the graph's fp16 casts and Q/DQ nodes (explicit quantization).
        precision, typing = onnx_precision, "weak"
        flags.append("FP16")
        if onnx_precision == "int8":
            flags.append("INT8")
        notes.append(f"TensorRT {caps.version}: weak typing with {'+'.join(flags)} flags for a "
                     f"{onnx_precision} ONNX (strong typing is used from 10.12)")

    if dla_core is not None:
        if dla_core < 0:
            raise TrtCompatError(f"--dla-core must be 0 or more, got {dla_core}")
        if not caps.dla:
            raise TrtCompatError(f"TensorRT {caps.version} exposes no DLA device type")
        if precision == "fp32":
            raise TrtCompatError("DLA runs FP16 and INT8 only: add --fp16 (TensorRT 10) or build an fp16/int8 ONNX")
        flags.append("GPU_FALLBACK")  # layers DLA cannot run go to the GPU instead of failing the build

    level = None
    if hardware_compatible:
        if not caps.hardware_compatible:
            raise TrtCompatError(f"TensorRT {caps.version} cannot build hardware-compatible engines")
        if dla_core is not None:
            raise TrtCompatError("--hardware-compatible and --dla-core exclude each other (a DLA engine is tied to its SoC)")
        if compute_capability is not None and tuple(compute_capability) < AMPERE:
            raise TrtCompatError(
                f"--hardware-compatible needs an Ampere or newer GPU to build on (compute capability >= 8.0); "
                f"this one is {compute_capability[0]}.{compute_capability[1]}")
        level = "AMPERE_PLUS"
    if version_compatible:
        if not caps.version_compatible:
            raise TrtCompatError(f"TensorRT {caps.version} cannot build version-compatible engines")
        flags.append("VERSION_COMPATIBLE")
    return BuildPlan(tuple(net), tuple(flags), level, precision, typing, tuple(notes))


# -- running an engine somewhere else than where it was built --------------------------------

def engine_runs_here(built: dict, running_version: str, running_cc: tuple[int, int] | None,
                     running_gpu: str | None) -> list[str]:
    """Why an engine with these build facts cannot run on this TensorRT/GPU ([] if it can).

    ``built`` holds the sidecar's "tensorrt_version", "gpu_name", "compute_capability"
    ("8.7"), "version_compatible" and "hardware_compatible".
    """
    problems: list[str] = []
    b = parse_version(built.get("tensorrt_version", "0.0"))
    r = parse_version(running_version)
    if built.get("version_compatible"):
        if b.major != r.major or r < b:
            problems.append(f"it was built version-compatible with TensorRT {b}, which runs only on TensorRT "
                            f"{b.major}.x from {b} on; this is TensorRT {r}")
    elif b != r:
        problems.append(f"it was built with TensorRT {b}, this is TensorRT {r}")
    if running_cc is not None:
        built_cc = parse_compute_capability(built.get("compute_capability", "0.0"))
        if built.get("hardware_compatible"):
            if tuple(running_cc) < AMPERE:
                problems.append(f"it was built hardware-compatible (Ampere and newer); this GPU is compute "
                                f"capability {running_cc[0]}.{running_cc[1]}")
        elif built_cc != tuple(running_cc) or (running_gpu and built.get("gpu_name") and built["gpu_name"] != running_gpu):
            problems.append(f"it was built for {built.get('gpu_name', '?')} (compute capability "
                            f"{built_cc[0]}.{built_cc[1]}), this GPU is {running_gpu or '?'} ({running_cc[0]}.{running_cc[1]})")
    return problems


def parse_compute_capability(text: str | tuple | list) -> tuple[int, int]:
    if isinstance(text, (tuple, list)):
        return int(text[0]), int(text[1])
    m = re.match(r"^\s*(\d+)\.(\d+)\s*$", str(text))
    if not m:
        raise TrtCompatError(f"cannot read a compute capability from {text!r} (expected e.g. '8.7')")
    return int(m.group(1)), int(m.group(2))
