"""What ``--backend auto`` runs for a model with variants: the fastest correct path on this machine.

A model with variants is an fp32 ONNX with ``NAME.int8cpu.onnx`` / ``NAME.fp16.onnx`` beside it
whose metadata names it as their parent (the shipped ``edge_m_camvid`` is one). The choice is a
pure function of what was detected (``choose``), so every branch is tested; ``detect`` reads
the machine once:

1. TensorRT (with pycuda and an NVIDIA GPU): the fp16 variant (TensorRT 11 takes precision from
   the graph), built once into a cached engine;
2. else OpenVINO on a CPU with AMX: the fp32 graph at bf16 (AMX runs bf16 matrix tiles; no
   calibration, accuracy of fp32 within a tenth of a point);
3. else an x86 CPU with VNNI (AVX-512 VNNI or AVX-VNNI): the int8 ``cpu`` variant on ONNX Runtime
   (int8 dot products in one instruction; OpenVINO's bf16 without AMX and its int8 kernels were
   both measured slower than ONNX Runtime's int8 on such a CPU: README, CPU table);
4. else an x86 CPU with AVX2 but no VNNI: the same int8 variant on ONNX Runtime. Its weights
   have 7 bits, so AVX2's saturating int16 pair sums stay exact (export/quantize.py); it was
   measured 1.55-1.6x faster than fp32 on such a CPU, with OpenVINO's int8 within 10 % of it (README);
5. else the fp32 graph on ONNX Runtime.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

VARIANTS = ("int8cpu", "fp16")
PACKAGES = {"tensorrt": ("tensorrt", "pycuda"), "openvino": ("openvino",)}  # backend -> Machine.packages it gives
AMX_FLAGS = frozenset({"amx_bf16", "amx_tile"})
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})


@dataclass(frozen=True)
class Machine:
    """What the choice depends on."""

    cpu_name: str = ""
    cpu_flags: frozenset[str] = frozenset()
    packages: frozenset[str] = frozenset()  # importable: tensorrt, pycuda, openvino
    nvidia_gpu: bool = False

    @property
    def amx(self) -> bool:
        return AMX_FLAGS <= self.cpu_flags

    @property
    def vnni(self) -> bool:
        return bool(VNNI_FLAGS & self.cpu_flags)

    @property
    def avx2(self) -> bool:
        return "avx2" in self.cpu_flags

    def describe(self) -> str:
        isa = ", ".join(name for name, on in (("AMX", self.amx), ("VNNI", self.vnni),
                                              ("AVX-512 BF16", "avx512_bf16" in self.cpu_flags)) if on)
        gpu = "NVIDIA GPU" if self.nvidia_gpu else "no NVIDIA GPU"
        return f"{self.cpu_name or platform.machine()} ({isa or 'no AMX/VNNI'}), {gpu}"


@dataclass(frozen=True)
class Choice:
    backend: str  # open_backend's name
    path: Path  # the file to run
    variant: str  # fp32, int8cpu, fp16
    reason: str  # one line: why this is the fastest correct path here
    options: dict = field(default_factory=dict)  # backend options the choice implies

    def describe(self) -> str:
        opts = "".join(f", --{k.replace('_', '-')} {v}" for k, v in self.options.items())
        return f"auto: {self.path.name} on {self.backend}{opts} ({self.reason})"


def cpu_facts() -> tuple[str, frozenset[str]]:
    """(model name, ISA flags) from /proc/cpuinfo; ("", empty) where there is none."""
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name, flags


def detect() -> Machine:
    """This machine's CPU, GPU and the packages of the backends ``choose`` weighs that can run
    here (each backend's own ``available()`` says)."""
    from .backends import unavailable_reason
    from .backends.base import has_nvidia_gpu

    name, flags = cpu_facts()
    packages = frozenset(p for backend, needs in PACKAGES.items() if unavailable_reason(backend) is None
                         for p in needs)
    return Machine(name, flags, packages, has_nvidia_gpu())


def variants_of(model: Path) -> dict[str, Path]:
    """The variant files beside ``model`` that name it, as it is now, as their parent."""
    from .artifact import read_onnx_meta
    from .files import sha256_file
    from .metadata import MetadataError

    model = Path(model)
    found: dict[str, Path] = {}
    if model.suffix != ".onnx" or not model.is_file():
        return found
    digest = None
    for variant in VARIANTS:
        path = model.with_name(f"{model.stem}.{variant}{model.suffix}")
        if not path.is_file():
            continue
        try:
            extra = read_onnx_meta(path).extra
        except MetadataError:
            continue
        digest = digest or sha256_file(model)
        if extra.get("variant") == variant and extra.get("parent_sha256") == digest:
            found[variant] = path
    return found


def choose(model: Path, machine: Machine, variants: dict[str, Path]) -> Choice:
    """The fastest correct path for ``model`` (an fp32 ONNX) with ``variants`` on ``machine``."""
    model = Path(model)
    if {"tensorrt", "pycuda"} <= machine.packages and machine.nvidia_gpu:
        if "fp16" in variants:
            return Choice("tensorrt", variants["fp16"], "fp16",
                          "TensorRT and an NVIDIA GPU: the fp16 variant, built once into a cached engine")
        return Choice("tensorrt", model, "fp32", "TensorRT and an NVIDIA GPU: the fp32 graph (no fp16 variant beside it)")
    if "openvino" in machine.packages and machine.amx:
        return Choice("openvino", model, "fp32", "OpenVINO on a CPU with AMX: the fp32 graph computed in bf16",
                      {"ov_precision": "bf16"})
    if machine.vnni and "int8cpu" in variants:
        return Choice("onnxruntime", variants["int8cpu"], "int8cpu",
                      "a CPU with VNNI and no AMX: the int8 cpu variant on ONNX Runtime")
    if machine.avx2 and "int8cpu" in variants:
        return Choice("onnxruntime", variants["int8cpu"], "int8cpu",
                      "a CPU with AVX2 and no VNNI: the int8 cpu variant on ONNX Runtime, its 7-bit weights exact here")
    why = "no int8cpu variant beside the model" if "int8cpu" not in variants else "no AVX2 or VNNI on this CPU"
    return Choice("onnxruntime", model, "fp32", f"the fp32 graph on ONNX Runtime ({why})")


def pick(model: Path, machine: Machine | None = None) -> Choice | None:
    """The choice for ``model`` if it is a model with variants (else None: run it as given)."""
    variants = variants_of(model)
    if not variants:
        return None
    return choose(model, machine or detect(), variants)


def _usable(backend: str) -> str:
    """What ``dilseg info --backends`` says of a backend that can run here."""
    if backend == "openvino":
        import openvino as ov

        from .backends.openvino_backend import shared_core

        core = shared_core()
        default = core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
        return (f"{ov.get_version()}, devices {', '.join(core.available_devices)}, "
                f"CPU default precision {default}")
    if backend == "tensorrt":
        import tensorrt as trt

        return f"{trt.__version__}, NVIDIA GPU seen"
    from importlib.metadata import version

    return f"tritonclient {version('tritonclient')}, for triton:// served models"


def backend_lines(model: Path | None, machine: Machine | None = None) -> list[str]:
    """`dilseg info --backends`: each backend and whether it runs here, the machine, and what
    ``auto`` runs for ``model`` and why."""
    import onnxruntime as ort

    from .backends import unavailable_reason

    machine = machine or detect()
    lines = [f"machine        {machine.describe()}",
             f"onnxruntime    {ort.__version__}, providers {', '.join(ort.get_available_providers())}"]
    for backend in ("openvino", "tensorrt", "triton"):
        reason = unavailable_reason(backend)
        lines.append(f"{backend:<15}{'not usable here: ' + reason if reason else _usable(backend)}")
    if model is not None:
        choice = pick(Path(model), machine)
        lines.append(choice.describe() if choice else
                     f"auto: {Path(model).name} by its suffix (no variants beside it that name it as their parent)")
    return lines
