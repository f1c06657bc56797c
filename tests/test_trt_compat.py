"""Version gating of every TensorRT API dilseg uses: pure functions of a version string."""

import pytest

from dilseg.runtime.trt.compat import (BuildPlan, TrtCompatError, TrtVersion, check_supported, describe,
                                       engine_runs_here, parse_compute_capability, parse_version, plan_build)


@pytest.mark.parametrize("text,expected", [
    ("10.3.0.30", (10, 3, 0)), ("10.13.3.9.post1", (10, 13, 3)), ("11.4.0", (11, 4, 0)), ("11.4", (11, 4, 0)),
])
def test_parse_version(text, expected):
    assert parse_version(text) == TrtVersion(*expected)


def test_parse_version_rejects_garbage():
    with pytest.raises(TrtCompatError, match="cannot read a TensorRT version"):
        parse_version("banana")


def test_jetpack6_tensorrt_10_3():
    caps = describe("10.3.0.30")
    assert caps.weak_typing  # BuilderFlag.FP16 / INT8 still exist
    assert caps.strongly_typed_flag and not caps.strongly_typed_reliable and not caps.strongly_typed_always
    assert caps.progress_monitor and caps.version_compatible and caps.hardware_compatible
    assert caps.platform_has_fast_fp16 and caps.jetpack and caps.tested


def test_desktop_tensorrt_10_13():
    caps = describe("10.13.0")
    assert caps.weak_typing and caps.strongly_typed_flag and caps.strongly_typed_reliable
    assert not caps.strongly_typed_always


def test_tensorrt_11_4_is_strongly_typed_only():
    caps = describe("11.4.0")
    assert not caps.weak_typing and caps.strongly_typed_always
    assert not caps.platform_has_fast_fp16  # removed in 11
    assert not caps.jetpack  # "JetPack is not supported in TensorRT 11.4.0"
    assert caps.progress_monitor and caps.version_compatible and caps.hardware_compatible


def test_old_tensorrt_refused_and_future_noted():
    with pytest.raises(TrtCompatError, match="needs TensorRT 10.x or 11.x"):
        check_supported(describe("8.6.1"))
    future = describe("12.0.0")
    check_supported(future)
    assert not future.tested and future.strongly_typed_always and "newer than dilseg" in future.notes[0]


# -- precision plans ---------------------------------------------------------------------------

def test_fp32_onnx_plans():
    p = plan_build(describe("10.3.0"), "fp32")
    assert p == BuildPlan((), (), None, "fp32", "weak")
    p = plan_build(describe("11.4.0"), "fp32")
    assert p.network_flags == () and p.builder_flags == () and p.engine_precision == "fp32" and p.typing == "strong"


def test_fp16_flag_only_on_tensorrt_10():
    for v in ("10.3.0", "10.13.0"):
        p = plan_build(describe(v), "fp32", fp16=True)
        assert p.builder_flags == ("FP16",) and p.engine_precision == "fp16" and p.typing == "weak"
    with pytest.raises(TrtCompatError, match="strongly typed only.*Export an fp16 ONNX"):
        plan_build(describe("11.4.0"), "fp32", fp16=True)


def test_fp16_flag_refused_for_lower_precision_onnx():
    with pytest.raises(TrtCompatError, match="fp32 ONNX only.*already fp16"):
        plan_build(describe("10.13.0"), "fp16", fp16=True)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_graph_precision_per_version(precision):
    old = plan_build(describe("10.3.0"), precision)  # before 10.12: weak typing + precision flags
    assert old.typing == "weak" and "FP16" in old.builder_flags and old.network_flags == ()
    assert ("INT8" in old.builder_flags) == (precision == "int8") and old.notes
    mid = plan_build(describe("10.13.0"), precision)  # 10.12+: STRONGLY_TYPED network flag
    assert mid.network_flags == ("STRONGLY_TYPED",) and mid.builder_flags == () and mid.typing == "strong"
    new = plan_build(describe("11.4.0"), precision)  # 11: strongly typed by default, no flags at all
    assert new.network_flags == () and new.builder_flags == () and new.engine_precision == precision


def test_dla_plan():
    p = plan_build(describe("10.3.0"), "fp16", dla_core=0)
    assert "GPU_FALLBACK" in p.builder_flags
    with pytest.raises(TrtCompatError, match="DLA runs FP16 and INT8 only"):
        plan_build(describe("10.3.0"), "fp32", dla_core=1)
    with pytest.raises(TrtCompatError, match="--dla-core must be 0 or more"):
        plan_build(describe("10.3.0"), "fp16", dla_core=-1)


def test_compatibility_plans():
    p = plan_build(describe("10.13.0"), "fp32", hardware_compatible=True, version_compatible=True,
                   compute_capability=(8, 9))
    assert p.hardware_compatibility_level == "AMPERE_PLUS" and "VERSION_COMPATIBLE" in p.builder_flags
    with pytest.raises(TrtCompatError, match="Ampere or newer.*7.5"):
        plan_build(describe("10.13.0"), "fp32", hardware_compatible=True, compute_capability=(7, 5))
    with pytest.raises(TrtCompatError, match="exclude each other"):
        plan_build(describe("10.3.0"), "fp16", hardware_compatible=True, dla_core=0)


def test_unknown_precision():
    with pytest.raises(TrtCompatError, match="unknown ONNX precision"):
        plan_build(describe("10.3.0"), "bf16")


# -- where an engine can run -------------------------------------------------------------------

BUILT = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7",
         "version_compatible": False, "hardware_compatible": False}


def test_engine_runs_only_where_built():
    assert engine_runs_here(BUILT, "10.3.0", (8, 7), "Orin") == []
    (why,) = engine_runs_here(BUILT, "10.13.0", (8, 7), "Orin")
    assert "built with TensorRT 10.3.0, this is TensorRT 10.13.0" in why
    (why,) = engine_runs_here(BUILT, "10.3.0", (8, 9), "NVIDIA GeForce RTX 4090")
    assert "built for Orin (compute capability 8.7)" in why and "RTX 4090 (8.9)" in why


def test_compatible_engines_run_further():
    vc = {**BUILT, "version_compatible": True}
    assert engine_runs_here(vc, "10.13.0", (8, 7), "Orin") == []
    assert engine_runs_here(vc, "10.2.0", (8, 7), "Orin")  # never on an older TensorRT
    assert engine_runs_here(vc, "11.4.0", (8, 7), "Orin")  # nor across a major version
    hc = {**BUILT, "gpu_name": "NVIDIA A100", "compute_capability": "8.0", "hardware_compatible": True}
    assert engine_runs_here(hc, "10.3.0", (8, 9), "NVIDIA L4") == []
    assert "Ampere and newer" in engine_runs_here(hc, "10.3.0", (7, 5), "Tesla T4")[0]


def test_parse_compute_capability():
    assert parse_compute_capability("8.7") == (8, 7)
    assert parse_compute_capability([9, 0]) == (9, 0)
    with pytest.raises(TrtCompatError):
        parse_compute_capability("sm_87")
