"""Engine sidecars and the engine cache: what an engine was built from and for, and whether a
cached engine can be reused or must be rebuilt (and why).

An engine is only valid for the ONNX, TensorRT version, GPU, precision and shape profile it
was built with, so the sidecar ``model.engine.json`` records all of them next to the model
metadata, plus the engine file's own sha256 so a truncated or replaced engine is caught
before TensorRT ever sees it. No TensorRT import here: everything is plain files and JSON.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from dilseg import __version__

from ..artifact import sidecar_path
from ..backends.base import BackendError
from ..errors import os_errors_as
from ..files import atomic_write_bytes, sha256_file
from ..metadata import MetadataError, ModelMeta
from .compat import engine_runs_here

SIDECAR_SCHEMA = 1


class EngineError(BackendError):
    """A TensorRT engine that cannot be used here; the message names what does not match."""


# -- sidecar -------------------------------------------------------------------------------

def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def make_sidecar(meta: ModelMeta, *, tensorrt_version: str, gpu_name: str, compute_capability: str,
                 precision: str, profile: dict | None, onnx_sha256: str, engine_sha256: str, engine_size: int,
                 hardware_compatible: bool = False, version_compatible: bool = False, dla_core: int | None = None,
                 build_seconds: float | None = None, io: list[dict] | None = None, onnx_path: str = "",
                 options: dict | None = None, built_at: str | None = None) -> dict:
    """The sidecar dict: ``meta`` (as in the ONNX) plus what the engine was built for."""
    return {
        "schema": SIDECAR_SCHEMA,
        "meta": meta.to_dict(),
        "tensorrt_version": str(tensorrt_version),
        "gpu_name": gpu_name,
        "compute_capability": compute_capability,
        "precision": precision,
        "profile": profile,
        "onnx_sha256": onnx_sha256,
        "onnx_path": onnx_path,
        "engine_sha256": engine_sha256,
        "engine_size": int(engine_size),
        "hardware_compatible": bool(hardware_compatible),
        "version_compatible": bool(version_compatible),
        "dla_core": dla_core,
        "io": io or [],
        "build_seconds": None if build_seconds is None else round(float(build_seconds), 3),
        "built_at": built_at or utc_now(),
        "dilseg_version": __version__,
        "options": options or {},
    }


def write_engine(engine_path: str | Path, engine: bytes | memoryview, sidecar: dict) -> None:
    """Write the engine, then its sidecar, each atomically. A crash in between leaves an engine
    whose sha256 no longer matches the old sidecar (or none at all): it is rebuilt, never trusted."""
    engine_path = Path(engine_path)
    atomic_write_bytes(engine_path, engine, fsync=True)
    text = json.dumps(sidecar, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(sidecar_path(engine_path), text.encode(), fsync=True)


REQUIRED_FACTS = ("meta", "tensorrt_version", "gpu_name", "compute_capability", "precision", "onnx_sha256",
                  "engine_sha256")


def load_sidecar(engine_path: str | Path) -> dict:
    """The sidecar of an engine, checked for the facts every later step relies on."""
    engine_path = Path(engine_path)
    side_path = sidecar_path(engine_path)
    if not side_path.is_file():
        raise EngineError(f"{engine_path}: no sidecar {side_path.name} beside it, so what it was built for is "
                          "unknown; rebuild it with `dilseg build MODEL.onnx -o " + str(engine_path) + "`")
    try:
        with os_errors_as(EngineError, side_path, "read the sidecar"):
            side = json.loads(side_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"{side_path}: corrupt sidecar ({exc}); rebuild the engine with `dilseg build`") from None
    if not isinstance(side, dict):
        raise EngineError(f"{side_path}: corrupt sidecar (not a JSON object); rebuild the engine with `dilseg build`")
    missing = [k for k in REQUIRED_FACTS if k not in side]
    if missing:
        raise EngineError(f"{side_path}: sidecar lacks {', '.join(missing)}; rebuild the engine with `dilseg build`")
    try:
        ModelMeta.from_dict(side["meta"])
    except (MetadataError, TypeError, ValueError) as exc:
        raise EngineError(f"{side_path}: the model metadata in the sidecar is invalid ({exc}); rebuild the engine") from None
    return side


def verify_engine_file(engine_path: str | Path, side: dict) -> None:
    """The engine file must be the one the sidecar describes: same size, same sha256."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise EngineError(f"{engine_path}: no such engine file")
    size = engine_path.stat().st_size
    want = side.get("engine_size")
    if want is not None and size != int(want):
        raise EngineError(f"{engine_path}: the engine is {size} bytes but its sidecar says {want}: the file is "
                          "truncated or was replaced; rebuild it with `dilseg build`")
    with os_errors_as(EngineError, engine_path, "read the engine"):
        digest = sha256_file(engine_path)
    if digest != side["engine_sha256"]:
        raise EngineError(f"{engine_path}: the engine's sha256 ({digest[:12]}…) differs from the one in its sidecar "
                          f"({str(side['engine_sha256'])[:12]}…): the file is corrupt or belongs to another build; "
                          "rebuild it with `dilseg build`")


@dataclass(frozen=True)
class RunningFacts:
    """Where an engine is about to run."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]


def check_runs_here(engine_path: str | Path, side: dict, running: RunningFacts) -> None:
    """Refuse an engine built for another TensorRT version or GPU, before deserializing it."""
    problems = engine_runs_here(side, running.tensorrt_version, running.compute_capability, running.gpu_name)
    if problems:
        raise EngineError(f"{engine_path}: this engine cannot run here: " + "; ".join(problems)
                          + ". Engines are tied to the TensorRT version and GPU they were built with: rebuild it "
                            "on this machine with `dilseg build` (or pass the .onnx and let dilseg build and cache it)")


def check_engine(engine_path: str | Path, running: RunningFacts) -> dict:
    """Everything checkable about an engine before TensorRT opens it; returns its sidecar."""
    side = load_sidecar(engine_path)
    verify_engine_file(engine_path, side)
    check_runs_here(engine_path, side, running)
    return side


# -- the cache -----------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheKey:
    """What makes a cached engine reusable: all equal, or rebuild."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profile: dict | None = None
    dla_core: int | None = None
    # Compatible engines may run slower (NVIDIA's engine-compatibility notes): asking for one,
    # or no longer asking, is a different engine.
    hardware_compatible: bool = False
    version_compatible: bool = False

    @classmethod
    def from_sidecar(cls, side: dict) -> "CacheKey":
        return cls(side["onnx_sha256"], str(side["tensorrt_version"]), side["gpu_name"], side["compute_capability"],
                   side["precision"], side.get("profile"), side.get("dla_core"),
                   bool(side.get("hardware_compatible")), bool(side.get("version_compatible")))


def describe_profile(profile: dict | None) -> str:
    if not profile:
        return "none"
    fmt = lambda s: "x".join(str(int(v)) for v in s)  # noqa: E731
    if profile.get("min") == profile.get("opt") == profile.get("max"):
        return f"{profile.get('input', '?')} {fmt(profile['min'])}"
    return f"{profile.get('input', '?')} min {fmt(profile['min'])} opt {fmt(profile['opt'])} max {fmt(profile['max'])}"


def key_differences(old: CacheKey, new: CacheKey) -> list[str]:
    """Each reason the engine built for ``old`` is not the one wanted for ``new``."""
    reasons = []
    if old.onnx_sha256 != new.onnx_sha256:
        reasons.append(f"the ONNX changed (sha256 {old.onnx_sha256[:12]}… -> {new.onnx_sha256[:12]}…)")
    if old.tensorrt_version != new.tensorrt_version:
        reasons.append(f"TensorRT changed ({old.tensorrt_version} -> {new.tensorrt_version})")
    if old.gpu_name != new.gpu_name or old.compute_capability != new.compute_capability:
        reasons.append(f"the GPU changed ({old.gpu_name} {old.compute_capability} -> {new.gpu_name} {new.compute_capability})")
    if old.precision != new.precision:
        reasons.append(f"the precision changed ({old.precision} -> {new.precision})")
    if _norm_profile(old.profile) != _norm_profile(new.profile):
        reasons.append(f"the shape profile changed ({describe_profile(old.profile)} -> {describe_profile(new.profile)})")
    if old.dla_core != new.dla_core:
        reasons.append(f"the DLA core changed ({old.dla_core} -> {new.dla_core})")
    for flag in ("hardware_compatible", "version_compatible"):
        if getattr(old, flag) != getattr(new, flag):
            was, now = ("on", "off") if getattr(old, flag) else ("off", "on")
            reasons.append(f"{flag.replace('_', '-')} changed ({was} -> {now})")
    return reasons


def _norm_profile(profile: dict | None):
    if not profile:
        return None
    return (profile.get("input"), *(tuple(int(v) for v in profile.get(k, ())) for k in ("min", "opt", "max")))


@dataclass
class Decision:
    reuse: bool
    engine_path: Path
    reasons: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.reuse:
            return f"reusing cached engine {self.engine_path}"
        return f"building {self.engine_path}: " + "; ".join(self.reasons)


def decide(engine_path: str | Path, wanted: CacheKey) -> Decision:
    """Reuse the engine at ``engine_path`` if it was built from and for exactly ``wanted``."""
    engine_path = Path(engine_path)
    if not engine_path.exists():
        return Decision(False, engine_path, ["no cached engine yet"])
    try:
        side = load_sidecar(engine_path)
        verify_engine_file(engine_path, side)
    except EngineError as exc:
        return Decision(False, engine_path, [f"the cached engine is unusable ({str(exc).split(': ', 1)[-1]})"])
    reasons = key_differences(CacheKey.from_sidecar(side), wanted)
    return Decision(not reasons, engine_path, reasons)


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dilseg" / "engines"


def cached_engine_path(onnx_path: str | Path, onnx_sha256: str, precision: str,
                       writable: bool | None = None) -> Path:
    """Where the engine for an ONNX lives: beside it (``model.fp16.engine``) when that folder is
    writable, else in the user cache (a shipped model inside site-packages usually is not)."""
    onnx_path = Path(onnx_path)
    name = f"{onnx_path.stem}.{precision}.engine"
    if writable is None:
        writable = os.access(onnx_path.parent, os.W_OK)
    if writable:
        return onnx_path.with_name(name)
    return user_cache_dir() / f"{onnx_path.stem}-{onnx_sha256[:12]}.{precision}.engine"

