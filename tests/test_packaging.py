"""A plain `pip install .` (not editable) must carry every subpackage and the shipped model:
build the wheel from this checkout and look inside it, then run `dilseg info` from it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def package_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.py") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Build from a clean copy: setuptools reuses a checkout's build/ folder, whose stale files
    # would hide a package missing from pyproject. --no-build-isolation keeps it offline.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for folder in ("dilseg", "export", "runtime", "demo", "models"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.engine*"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "No module named" in proc.stderr and "wheel" in proc.stderr:
        pytest.skip(f"cannot build wheels here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    (whl,) = out.glob("dilseg-*.whl")
    return whl


def test_wheel_holds_every_module_and_the_shipped_model(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (("export", "export"), ("runtime", "runtime"), ("demo", "demo"), ("dilseg", "")):
        for rel in package_files(REPO / folder):
            target = f"dilseg/{package + '/' if package else ''}{rel}"
            assert target in names, f"{folder}/{rel} is missing from the wheel (as {target}): add its package to pyproject"
    for shipped in ("edge_m_camvid.onnx", "edge_m_camvid.safetensors", "edge_m_camvid.md"):
        assert f"dilseg/models/{shipped}" in names
    assert not any(n.startswith(("runtime/", "export/", "demo/", "tests/")) for n in names), \
        "generic top-level packages leaked into the wheel"


def test_wheel_declares_the_plugins_the_runtime_discovers(wheel: Path) -> None:
    # The runtime never imports the export side or the demo by name: their commands and the
    # PyTorch backend reach it through entry points, which must be in the wheel and resolve.
    import configparser

    zf = zipfile.ZipFile(wheel)
    (ep_file,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
    eps = configparser.ConfigParser()
    eps.read_string(zf.read(ep_file).decode())
    assert {"export", "demo"} <= set(eps["dilseg.commands"]) and set(eps["dilseg.backends"]) == {"pytorch"}
    for group in ("dilseg.commands", "dilseg.backends"):
        for target in eps[group].values():
            module = target.split(":")[0]
            assert module.replace(".", "/") + ".py" in zf.namelist(), f"{group}: {target} is not in the wheel"


def test_installed_wheel_runs_info_on_the_default_model(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import dilseg.runtime.cli as c, dilseg.runtime.backends as b; "
            "assert b.__file__.startswith(sys.argv[1]), b.__file__; sys.exit(c.main(['info']))")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "edge_m" in proc.stdout and "Bicyclist" in proc.stdout
