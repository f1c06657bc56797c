"""`--backend auto` on a model with variants: every branch of the pure decision, the variants a
model really has, and the choice made for real on this machine in run, bench, info and the demo."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from dilseg.runtime.autoselect import Choice, Machine, choose, detect, pick, variants_of
from dilseg.runtime.defaults import default_model_path, resolve_model

SHIPPED = default_model_path()
MODEL = Path("/models/m.onnx")
BOTH = {"int8cpu": Path("/models/m.int8cpu.onnx"), "fp16": Path("/models/m.fp16.onnx")}
ZEN4 = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni"})
SAPPHIRE_RAPIDS = ZEN4 | {"amx_bf16", "amx_tile", "amx_int8"}
AVX2_ONLY = frozenset({"avx", "avx2", "fma"})  # e.g. AMD Zen 3, Intel Skylake client
OLD_X86 = frozenset({"sse4_2", "avx"})  # Sandy Bridge: no AVX2
ARM = frozenset({"fp", "asimd", "asimddp", "sve"})


def machine(flags=ZEN4, packages=(), gpu=False) -> Machine:
    return Machine("test CPU", frozenset(flags), frozenset(packages), gpu)


@pytest.mark.parametrize("m, variants, want", [
    # TensorRT needs both packages and a GPU; then the fp16 variant, or fp32 when there is none.
    (machine(packages=("tensorrt", "pycuda", "openvino"), gpu=True), BOTH, ("tensorrt", "m.fp16.onnx", {})),
    (machine(packages=("tensorrt", "pycuda"), gpu=True), {"int8cpu": BOTH["int8cpu"]}, ("tensorrt", "m.onnx", {})),
    (machine(packages=("tensorrt", "pycuda")), BOTH, ("onnxruntime", "m.int8cpu.onnx", {})),  # no GPU
    (machine(packages=("tensorrt",), gpu=True), BOTH, ("onnxruntime", "m.int8cpu.onnx", {})),  # no pycuda
    # OpenVINO bf16 on AMX (which is on CPUs that also have VNNI).
    (machine(SAPPHIRE_RAPIDS, ("openvino",)), BOTH, ("openvino", "m.onnx", {"ov_precision": "bf16"})),
    (machine(SAPPHIRE_RAPIDS), BOTH, ("onnxruntime", "m.int8cpu.onnx", {})),  # AMX without openvino
    # VNNI without AMX: int8 on ONNX Runtime, with or without openvino installed.
    (machine(ZEN4, ("openvino",)), BOTH, ("onnxruntime", "m.int8cpu.onnx", {})),
    (machine(ZEN4), {"fp16": BOTH["fp16"]}, ("onnxruntime", "m.onnx", {})),  # no int8 variant
    # AVX2 without VNNI: the same int8 variant (7-bit weights, exact there), with or without openvino.
    (machine(AVX2_ONLY, ("openvino",)), BOTH, ("onnxruntime", "m.int8cpu.onnx", {})),
    (machine(AVX2_ONLY), {"fp16": BOTH["fp16"]}, ("onnxruntime", "m.onnx", {})),  # no int8 variant
    (machine(OLD_X86, ("openvino",)), BOTH, ("onnxruntime", "m.onnx", {})),  # no AVX2: fp32
    (machine(ARM), BOTH, ("onnxruntime", "m.onnx", {})),  # not x86
    (machine(frozenset()), BOTH, ("onnxruntime", "m.onnx", {})),  # nothing known (no /proc/cpuinfo)
])
def test_every_branch_of_the_decision(m, variants, want) -> None:
    choice = choose(MODEL, m, variants)
    assert (choice.backend, choice.path.name, choice.options) == want
    assert choice.reason and choice.describe().startswith(f"auto: {want[1]} on {want[0]}")


def test_reasons_name_what_decided() -> None:
    assert "no AVX2 or VNNI" in choose(MODEL, machine(OLD_X86), BOTH).reason
    assert "AVX2 and no VNNI" in choose(MODEL, machine(AVX2_ONLY), BOTH).reason
    assert "no int8cpu variant" in choose(MODEL, machine(ZEN4), {}).reason
    assert "AMX" in choose(MODEL, machine(SAPPHIRE_RAPIDS, ("openvino",)), BOTH).reason
    assert "--ov-precision bf16" in choose(MODEL, machine(SAPPHIRE_RAPIDS, ("openvino",)), BOTH).describe()


def test_variants_are_the_files_that_name_this_model_as_their_parent(tmp_path) -> None:
    for name in ("edge_m_camvid.onnx", "edge_m_camvid.int8cpu.onnx", "edge_m_camvid.fp16.onnx"):
        shutil.copy(SHIPPED.with_name(name), tmp_path / name)
    model = tmp_path / "edge_m_camvid.onnx"
    assert variants_of(model) == {"int8cpu": tmp_path / "edge_m_camvid.int8cpu.onnx",
                                  "fp16": tmp_path / "edge_m_camvid.fp16.onnx"}
    # A variant file named for another variant is not that variant.
    shutil.copy(tmp_path / "edge_m_camvid.fp16.onnx", tmp_path / "edge_m_camvid.int8cpu.onnx")
    assert set(variants_of(model)) == {"fp16"}
    # A replaced parent (another export) has no variants until they are made from it again.
    proto = onnx.load(str(model))
    proto.doc_string = "re-exported"
    onnx.save(proto, str(model))
    assert variants_of(model) == {} and pick(model) is None
    assert variants_of(tmp_path / "missing.onnx") == {}


def test_detect_reads_this_machine() -> None:
    m = detect()
    if Path("/proc/cpuinfo").is_file():
        assert m.cpu_flags and m.cpu_name
    # What dilseg's own tests run on must be importable where they say it is.
    assert "onnxruntime" not in m.packages and {"tensorrt", "pycuda", "openvino"} >= m.packages


def test_the_shipped_model_on_this_machine() -> None:
    """For real: the documented rule applied to what this machine has."""
    m = detect()
    choice = pick(SHIPPED, m)
    assert isinstance(choice, Choice)
    assert choice == choose(SHIPPED, m, {"int8cpu": SHIPPED.with_name("edge_m_camvid.int8cpu.onnx"),
                                         "fp16": SHIPPED.with_name("edge_m_camvid.fp16.onnx")})
    if (m.vnni or m.avx2) and not m.amx and not m.nvidia_gpu:
        assert (choice.backend, choice.path.name) == ("onnxruntime", "edge_m_camvid.int8cpu.onnx")


def dilseg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dilseg.runtime.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_run_bench_and_info_say_which_and_why() -> None:
    want = pick(SHIPPED)
    r = dilseg("run", "--source", "test://480x360?frames=8", "--max-frames", "8", "--quiet")
    assert r.returncode == 0, r.stderr
    assert want.describe() in r.stderr and f"dilseg run: {want.path.name} ({want.backend})" in r.stderr
    r = dilseg("run", "--model", "edge_m_camvid", "--source", "test://480x360?frames=4", "--max-frames", "4", "--quiet")
    assert r.returncode == 0 and want.describe() in r.stderr
    # An explicit backend runs the file as given.
    r = dilseg("run", "--backend", "onnxruntime", "--source", "test://480x360?frames=4", "--max-frames", "4", "--quiet")
    assert r.returncode == 0 and "auto:" not in r.stderr and "dilseg run: edge_m_camvid.onnx (onnxruntime)" in r.stderr
    r = dilseg("bench", "--source", "test://480x360?frames=30", "--frames", "10", "--warmup", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert want.describe() in r.stdout and f"backend {want.backend}" in r.stdout
    r = dilseg("info", "--backends")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("machine ") and want.describe() in r.stdout and "onnxruntime " in r.stdout


def test_shipped_model_by_name() -> None:
    assert resolve_model("edge_m_camvid") == SHIPPED
    assert resolve_model(None) == SHIPPED


def test_demo_auto_runs_the_choice() -> None:
    from dilseg.demo.loading import auto_choice, load_segmenter

    want = pick(SHIPPED)
    assert auto_choice(SHIPPED) == want
    segmenter = load_segmenter(SHIPPED, "auto")
    try:
        assert segmenter.backend.path == want.path and segmenter.backend.name == want.backend
    finally:
        segmenter.close()
