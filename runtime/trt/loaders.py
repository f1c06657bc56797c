"""Engine loaders, composed outside the runner as Polygraphy composes its loaders:
``TensorRTBackend(EngineFromFile("m.engine"))`` runs an engine built earlier;
``TensorRTBackend(EngineFromOnnx("m.onnx"))`` runs the cached engine of an ONNX, which the
loader builds (with progress bars) when it is missing or no longer matches.

A loader is called by the runner inside the device's CUDA context with the imported
``tensorrt`` module and the GPU, and returns the engine's bytes, checked against its sidecar.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import os_errors_as
from ..metadata import ModelMeta
from .build import BuildOptions, build_engine, expected_key, plan_for, prepare
from .cache import Decision, EngineError, RunningFacts, cached_engine_path, check_runs_here, decide, load_sidecar
from .compat import detect
from .cuda import Gpu


@dataclass
class LoadedEngine:
    """A serialized engine that may run here, and what its sidecar says about it."""

    path: Path
    data: bytes
    sidecar: dict

    @property
    def meta(self) -> ModelMeta:
        return ModelMeta.from_dict(self.sidecar["meta"])


def running_facts(trt: Any, gpu: Gpu) -> RunningFacts:
    return RunningFacts(str(detect(trt).version), gpu.name, gpu.compute_capability)


class EngineFromFile:
    """An engine from ``dilseg build`` (or the cache), refused before deserializing when it was built
    for another TensorRT or GPU, or is not the file its sidecar describes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __call__(self, trt: Any, gpu: Gpu) -> LoadedEngine:
        running = running_facts(trt, gpu)
        side = load_sidecar(self.path)
        check_runs_here(self.path, side, running)
        with os_errors_as(EngineError, self.path, "read the engine"):
            data = self.path.read_bytes()
        # Hash the bytes TensorRT will see (not the file a moment earlier): truncated or swapped -> refused.
        digest = hashlib.sha256(data).hexdigest()
        if digest != side["engine_sha256"] or len(data) != int(side.get("engine_size", len(data))):
            raise EngineError(f"{self.path}: the engine ({len(data)} bytes, sha256 {digest[:12]}…) is not the one "
                              f"its sidecar describes ({side.get('engine_size')} bytes, sha256 "
                              f"{str(side['engine_sha256'])[:12]}…): truncated, corrupt or replaced; rebuild it with "
                              "`dilseg build`")
        return LoadedEngine(self.path, data, side)


class EngineFromOnnx:
    """The engine of an ONNX, cached beside it (``model.fp16.engine``, or in the user cache when that
    folder is read-only) and rebuilt here, saying why, when the ONNX, TensorRT, the GPU, the
    precision or the shape profile changed. ``decision`` tells what the last call did."""

    def __init__(self, onnx_path: str | Path, options: BuildOptions | None = None, engine_path: str | Path | None = None,
                 rebuild: bool = False, log: Callable[[str], None] | None = None) -> None:
        self.onnx_path = Path(onnx_path)
        self.options = options or BuildOptions()
        self.engine_path = Path(engine_path) if engine_path else None
        self.rebuild = rebuild
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.decision: Decision | None = None

    def __call__(self, trt: Any, gpu: Gpu) -> LoadedEngine:
        caps = detect(trt)
        prepared = prepare(self.onnx_path, self.engine_path, self.options)
        plan = plan_for(caps, prepared, gpu.compute_capability)
        engine_path = self.engine_path or cached_engine_path(self.onnx_path, prepared.info.sha256, plan.engine_precision)
        with os_errors_as(EngineError, engine_path.parent, "create the engine cache folder"):
            engine_path.parent.mkdir(parents=True, exist_ok=True)
        self.decision = decide(engine_path, expected_key(prepared, str(caps.version), gpu, plan.engine_precision))
        if self.rebuild:
            self.decision.reuse, self.decision.reasons = False, ["a rebuild was asked for"]
        self.log(str(self.decision))
        if not self.decision.reuse:
            result = build_engine(self.onnx_path, engine_path, self.options, log=self.log, prepared=prepared)
            self.log(f"built {engine_path} in {result.seconds:.1f} s")
        return EngineFromFile(engine_path)(trt, gpu)
