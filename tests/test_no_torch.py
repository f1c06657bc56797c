"""The runtime never imports torch: checked in fresh interpreters, and `dilseg run` works with
torch made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

RUNTIME_MODULES = [
    "dilseg.runtime", "dilseg.runtime.cli", "dilseg.runtime.cli_run", "dilseg.runtime.sources",
    "dilseg.runtime.sinks", "dilseg.runtime.pipeline", "dilseg.runtime.bench", "dilseg.runtime.segmenter",
    "dilseg.runtime.preprocess", "dilseg.runtime.postprocess", "dilseg.runtime.artifact",
    "dilseg.runtime.metadata", "dilseg.runtime.backends", "dilseg.runtime.backends.onnxruntime_backend",
]

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


def test_importing_the_runtime_and_run_help_import_no_torch() -> None:
    r = python(f"""
        import importlib, sys
        for name in {RUNTIME_MODULES!r}:
            importlib.import_module(name)
        from dilseg.runtime.cli import main
        try:
            main(["run", "--help"])
        except SystemExit:
            pass
        print("TORCH_LOADED", sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
    """)
    assert r.returncode == 0, r.stderr
    assert "usage: dilseg run" in r.stdout
    assert "TORCH_LOADED []" in r.stdout


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
    assert "edge_m_camvid.onnx" in r.stdout
    masks = sorted((tmp_path / "masks").glob("*.png"))
    assert len(masks) == 3
    import cv2
    import numpy as np

    labels = cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (360, 480) and labels.max() <= 10 and len(np.unique(labels)) >= 2
