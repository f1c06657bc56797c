"""The runtime never imports torch: checked in fresh interpreters, and `dilseg run` works with
torch made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"


def runtime_modules() -> list[str]:
    """Every module under runtime/ (found on disk, so a new one is checked without being listed)."""
    names = []
    for path in sorted(RUNTIME.rglob("*.py")):
        parts = path.relative_to(RUNTIME).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(("dilseg.runtime", *parts)))
    return names


RUNTIME_MODULES = runtime_modules()

# Makes `import torch` fail, as on a box without it.
BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None
sys.meta_path.insert(0, _NoTorch())
"""


def python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_importing_every_runtime_module_and_run_help_import_no_torch() -> None:
    assert {"dilseg.runtime.trt.runner", "dilseg.runtime.trt.build", "dilseg.runtime.trt.kernels",
            "dilseg.runtime.cli_build", "dilseg.runtime.backends.factory"} <= set(RUNTIME_MODULES)
    r = python(BLOCK_TORCH + f"""
import importlib, sys
for name in {RUNTIME_MODULES!r}:
    importlib.import_module(name)
print("EXPORT_SIDE", sorted(m for m in sys.modules if m.startswith(("dilseg.export", "dilseg.demo"))))
from dilseg.runtime.cli import main
for command in ("run", "build"):
    try:
        main([command, "--help"])
    except SystemExit:
        pass
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "tensorrt", "pycuda")))
""")
    assert r.returncode == 0, r.stderr
    assert "usage: dilseg run" in r.stdout and "usage: dilseg build" in r.stdout
    assert "EXPORT_SIDE []" in r.stdout and "LOADED []" in r.stdout


def test_no_runtime_module_names_the_export_side() -> None:
    # Data flows export -> runtime -> demo: the runtime finds the export side's parts (the
    # PyTorch backend, the export/train commands) through entry points, never by name.
    offenders = [str(p.relative_to(RUNTIME)) for p in RUNTIME.rglob("*.py")
                 if "dilseg.export" in p.read_text() or "dilseg.demo" in p.read_text()]
    assert offenders == []


def test_weights_without_torch_are_a_clear_error(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\0" * 16)
    r = python(BLOCK_TORCH + f"""
from dilseg.runtime.backends import BackendError, open_backend
try:
    open_backend({str(weights)!r})
except BackendError as exc:
    print("ERROR", exc)
""")
    assert "ERROR" in r.stdout and "needs PyTorch" in r.stdout and "dilseg[export]" in r.stdout, r.stdout + r.stderr


def test_run_and_bench_work_without_torch(tmp_path: Path, small_onnx) -> None:
    r = python(BLOCK_TORCH + f"""
import sys
from dilseg.runtime.cli import main
rc = main(["run", "--model", {str(small_onnx)!r}, "--source", "test://96x64?frames=5",
           "--labels", {str(tmp_path / "masks")!r}, "--quiet"])
rc |= main(["bench", "--model", {str(small_onnx)!r}, "--frames", "5", "--warmup", "1", "--quiet"])
rc |= main(["info", {str(small_onnx)!r}])
print("RC", rc, "TORCH", "torch" in sys.modules)
""")
    assert "RC 0 TORCH False" in r.stdout, r.stdout + r.stderr
    assert len(list((tmp_path / "masks").glob("*.png"))) == 5


def test_the_shipped_model_runs_by_default_without_torch(tmp_path: Path) -> None:
    # A fresh install: no --model, no export step, no torch.
    r = python(BLOCK_TORCH + f"""
import sys
from dilseg.runtime.cli import main
rc = main(["run", "--source", "test://480x360?frames=3", "--labels", {str(tmp_path / "masks")!r}, "--quiet"])
rc |= main(["bench", "--frames", "3", "--warmup", "1", "--quiet"])
print("RC", rc, "TORCH", "torch" in sys.modules)
""", cwd=tmp_path)
    assert "RC 0 TORCH False" in r.stdout, r.stdout + r.stderr
    # auto may run a variant of the shipped model (edge_m_camvid.int8cpu.onnx) where it is faster here.
    assert "edge_m_camvid" in r.stdout
    masks = sorted((tmp_path / "masks").glob("*.png"))
    assert len(masks) == 3
    import cv2
    import numpy as np

    labels = cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (360, 480) and labels.max() <= 10 and len(np.unique(labels)) >= 2
