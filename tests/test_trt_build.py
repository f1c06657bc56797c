"""`dilseg build` and the builder: everything that needs no GPU, on real ONNX files.

TensorRT is not installable on CI machines, so the build itself is exercised in
test_trt_gpu.py (marked, skipped without a GPU); here: shape profiles, input validation,
the int8 flavour check, the clear error when TensorRT is missing, and the CLI.
"""

import io
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dilseg.runtime.trt.build import (DEFAULT_DYNAMIC_PROFILE, BuildError, BuildOptions, PhaseBars, ShapeProfile,
                                     asymmetric_qdq, parse_shape, prepare, resolve_profile)

HAVE_TRT = subprocess.run([sys.executable, "-c", "import tensorrt"], capture_output=True).returncode == 0


# -- helpers (the small ONNX fixture `trt_onnx` lives in conftest.py) -----------------------------

def with_meta(src: Path, dst: Path, **changes) -> Path:
    """A copy of an ONNX with its dilseg metadata changed."""
    import onnx

    from dilseg.export.onnx_export import attach_metadata
    from dilseg.runtime.artifact import read_onnx_meta

    proto = onnx.load(str(src))
    attach_metadata(proto, replace(read_onnx_meta(src), **changes))
    onnx.save(proto, str(dst))
    return dst


def quantize(src: Path, dst: Path, symmetric: bool) -> Path:
    """A real QDQ int8 graph from ONNX Runtime's static quantizer (uint8 asymmetric or int8 symmetric)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.items = iter([{"input": rng.normal(0, 1, (1, 3, 64, 96)).astype(np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    return dst


@pytest.fixture(scope="session")
def int8_onnx(trt_onnx, tmp_path_factory):
    d = tmp_path_factory.mktemp("int8")
    cpu_graph = quantize(trt_onnx["fixed"], d / "q_u8.onnx", symmetric=False)
    trt_graph = quantize(trt_onnx["fixed"], d / "q_s8.onnx", symmetric=True)
    return {
        "cpu": with_meta(cpu_graph, d / "cpu_int8.onnx", precision="int8", extra={"int8_target": "cpu"}),
        "unlabelled": with_meta(cpu_graph, d / "unlabelled_int8.onnx", precision="int8", extra={}),
        "tensorrt": with_meta(trt_graph, d / "trt_int8.onnx", precision="int8", extra={"int8_target": "tensorrt"}),
    }


# -- shape parsing and profiles ----------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("1x3x256x320", (None, (1, 3, 256, 320))),
    ("input:1x3x256x320", ("input", (1, 3, 256, 320))),
    (" 1X3X64X96 ", (None, (1, 3, 64, 96))),
    ("images:2,3,64,96", ("images", (2, 3, 64, 96))),
])
def test_parse_shape(text, expected):
    assert parse_shape(text) == expected


@pytest.mark.parametrize("text", ["", "1x3x", "x3x4", "1x3xfoo", "input:", "1 3 64 96", "-1x3x64x96"])
def test_parse_shape_errors(text):
    with pytest.raises(BuildError, match="expected NxCxHxW"):
        parse_shape(text, "--min")


DYN = [None, 3, "height", "width"]  # what ONNX Runtime reports for a dynamic dilseg input


def test_fixed_input_profile():
    p, default = resolve_profile("input", [1, 3, 64, 96])
    assert p == ShapeProfile("input", (1, 3, 64, 96), (1, 3, 64, 96), (1, 3, 64, 96)) and p.fixed and not default
    # Restating the fixed shape is fine; anything else is refused with the way out.
    resolve_profile("input", [1, 3, 64, 96], "1x3x64x96", "input:1x3x64x96", "1x3x64x96")
    with pytest.raises(BuildError, match="fixed input 1x3x64x96.*--dynamic"):
        resolve_profile("input", [1, 3, 64, 96], opt_s="1x3x128x128")


def test_dynamic_default_and_explicit_profiles():
    p, default = resolve_profile("input", DYN)
    assert default and p.to_dict() == {"input": "input", "min": [1, 3, 256, 320], "opt": [1, 3, 360, 480],
                                       "max": [1, 3, 720, 1280]}
    assert [parse_shape(s)[1] for s in DEFAULT_DYNAMIC_PROFILE] == [p.min, p.opt, p.max]
    p, default = resolve_profile("input", DYN, "1x3x64x64", "input:1x3x128x160", "2x3x256x256")
    assert (p.min, p.opt, p.max) == ((1, 3, 64, 64), (1, 3, 128, 160), (2, 3, 256, 256)) and not default
    p, _ = resolve_profile("input", DYN, opt_s="1x3x368x640")  # --opt alone: one fixed size
    assert p.fixed and p.opt == (1, 3, 368, 640)
    assert "min 1x3x64x64" in str(resolve_profile("input", DYN, "1x3x64x64", "1x3x64x96", "1x3x64x128")[0])


@pytest.mark.parametrize("args,message", [
    (("1x3x64x64", None, None), "--min alone is not a profile"),
    (("1x3x64x64", "1x3x64x64", None), "missing --max"),
    (("1x3x64x64", "1x3x32x64", "1x3x128x128"), "out of order on axis 2: need min <= opt <= max, got 64 / 32 / 128"),
    (("1x3x60x64", "1x3x64x64", "1x3x128x128"), "multiples of 8"),
    (("1x1x64x64", "1x1x64x64", "1x1x64x64"), "axis 1 of the ONNX input is fixed at 3"),
    (("1x3x64", "1x3x64x64", "1x3x64x64"), "expected 4 dimensions"),
    (("0x3x64x64", "1x3x64x64", "1x3x64x64"), "must be positive"),
    (("img:1x3x64x64", "1x3x64x64", "1x3x64x64"), "no input named 'img'; its input is 'input'"),
])
def test_profile_errors(args, message):
    with pytest.raises(BuildError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_profile("input", DYN, *args)


def test_profile_needs_three_channels():
    with pytest.raises(BuildError, match="3 channels"):
        resolve_profile("input", ["n", "c", "h", "w"], "1x1x64x64", "1x1x64x64", "1x1x64x64")


def test_profile_respects_fixed_axes_of_dynamic_input():
    with pytest.raises(BuildError, match="axis 0 of the ONNX input is fixed at 1"):
        resolve_profile("input", [1, 3, "h", "w"], "1x3x64x64", "2x3x64x64", "2x3x64x64")


# -- prepare: real files -----------------------------------------------------------------------

def test_prepare_real_onnx(trt_onnx, tmp_path):
    p = prepare(trt_onnx["fixed"], tmp_path / "m.engine", BuildOptions())
    assert p.info.meta.model == "edge_s" and p.info.input_name == "input" and p.profile.fixed
    assert len(p.info.sha256) == 64 and not p.notes
    d = prepare(trt_onnx["dynamic"], tmp_path / "d.engine", BuildOptions())
    assert d.default_profile and "default profile" in d.notes[0]


def test_prepare_refuses_bad_requests(trt_onnx, tmp_path):
    with pytest.raises(BuildError, match="must end in .engine"):
        prepare(trt_onnx["fixed"], tmp_path / "m.trt", BuildOptions())
    with pytest.raises(BuildError, match="--workspace must be a positive"):
        prepare(trt_onnx["fixed"], tmp_path / "m.engine", BuildOptions(workspace_mib=0))
    with pytest.raises(BuildError, match="--timing-cache .* is a folder"):
        prepare(trt_onnx["fixed"], tmp_path / "m.engine", BuildOptions(timing_cache=str(tmp_path)))
    with pytest.raises(BuildError, match="no such file"):
        prepare(tmp_path / "none.onnx", tmp_path / "m.engine", BuildOptions())
    (tmp_path / "notes.onnx").write_text("hello")
    with pytest.raises(BuildError, match="not an ONNX model, or a damaged one"):
        prepare(tmp_path / "notes.onnx", tmp_path / "m.engine", BuildOptions())
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(trt_onnx["fixed"].read_bytes()[:5000])
    with pytest.raises(BuildError, match="not an ONNX model, or a damaged one"):
        prepare(truncated, tmp_path / "m.engine", BuildOptions())


def test_fp16_option_needs_fp32_onnx(trt_onnx, tmp_path):
    fp16_meta = with_meta(trt_onnx["fixed"], tmp_path / "labelled_fp16.onnx", precision="fp16")
    with pytest.raises(BuildError, match="--fp16 applies to an fp32 ONNX only.*already fp16"):
        prepare(fp16_meta, tmp_path / "m.engine", BuildOptions(fp16=True))


def test_cpu_int8_refused(int8_onnx, tmp_path):
    with pytest.raises(BuildError, match="'cpu' flavour.*symmetric int8 Q/DQ.*--target tensorrt"):
        prepare(int8_onnx["cpu"], tmp_path / "m.engine", BuildOptions())
    # Without the metadata label the graph itself gives it away.
    assert asymmetric_qdq(int8_onnx["unlabelled"]).startswith("uint8 zero points")
    with pytest.raises(BuildError, match="uint8 zero points"):
        prepare(int8_onnx["unlabelled"], tmp_path / "m.engine", BuildOptions())
    # The TensorRT flavour passes every check that needs no TensorRT.
    assert asymmetric_qdq(int8_onnx["tensorrt"]) is None
    p = prepare(int8_onnx["tensorrt"], tmp_path / "m.engine", BuildOptions())
    assert p.info.meta.precision == "int8"


# -- what the built engine may output -------------------------------------------------------------

def engine_io_with(output_dtype: str) -> list[dict]:
    """The sidecar's I/O list (build.engine_io's form) of an engine with this label output type."""
    return [{"name": "input", "mode": "input", "dtype": "float", "shape": [1, 3, 64, 96]},
            {"name": "labels", "mode": "output", "dtype": output_dtype, "shape": [1, 64, 96]}]


@pytest.mark.parametrize("dtype", ["int8", "int64", "float", "half", "bool"])
def test_check_engine_io_refuses_labels_the_backend_cannot_read(trt_onnx, dtype):
    from dilseg.runtime.artifact import read_onnx_meta
    from dilseg.runtime.trt.build import check_engine_io

    meta = read_onnx_meta(trt_onnx["fixed"])
    with pytest.raises(BuildError, match=rf"the engine's output 'labels' is {dtype}, not int32/uint8 labels"):
        check_engine_io(engine_io_with(dtype), meta)


def test_check_engine_io_accepts_exactly_what_the_runner_opens(trt_onnx):
    from dilseg.runtime.artifact import read_onnx_meta
    from dilseg.runtime.trt import build, runner
    from dilseg.runtime.trt.build import check_engine_io

    meta = read_onnx_meta(trt_onnx["fixed"])
    assert build.LABEL_DTYPES == ("int32", "uint8")
    assert runner.LABEL_DTYPES is build.LABEL_DTYPES  # the runner's own check (_check_io) reads the same list
    for dtype in build.LABEL_DTYPES:
        check_engine_io(engine_io_with(dtype), meta)
    # The GPU renderer has one colour kernel per label type, and no other.
    from dilseg.runtime.trt.kernels import KERNELS

    kernels = set(re.findall(r"__global__ void colorize_blend_(\w+)\(", KERNELS))
    assert kernels == {"i32", "u8"} == {{"int32": "i32", "uint8": "u8"}[d] for d in build.LABEL_DTYPES}


# -- the timing cache: what set_timing_cache / get_timing_cache answered decides what is written ------

def test_a_refused_timing_cache_is_left_as_it_is_with_a_warning(tmp_path):
    from dilseg.runtime.trt.build import timing_cache_plan

    path = tmp_path / "t.cache"
    write_back, warning = timing_cache_plan(path, had_data=True, accepted=False, version="10.3.0",
                                            reason="Magic tag does not match")
    assert write_back is False
    assert warning.startswith(f"--timing-cache {path}: TensorRT 10.3.0 did not accept it (Magic tag does not match)")
    assert f"leaving {path} as it is" in warning and "another --timing-cache" in warning
    write_back, warning = timing_cache_plan(path, had_data=False, accepted=False, version="11.4.0")
    assert write_back is False and "refused a new timing cache" in warning and "is not written" in warning
    for had_data in (False, True):  # accepted (new or loaded): the build's cache replaces the file
        assert timing_cache_plan(path, had_data=had_data, accepted=True, version="10.3.0") == (True, None)


def test_no_timing_cache_after_the_build_is_a_warning_not_an_attribute_error(tmp_path):
    from dilseg.runtime.trt.build import timing_cache_bytes

    data, problem = timing_cache_bytes(None, tmp_path / "t.cache")  # get_timing_cache() returned None
    assert data == b"" and "TensorRT returned no timing cache after the build" in problem
    assert f"{tmp_path / 't.cache'} is not written (the engine is)" in problem


# -- progress bars -------------------------------------------------------------------------------

def test_phase_bars_follow_nested_phases():
    out = io.StringIO()
    bars = PhaseBars(file=out)
    bars.start("Building engine", None, 2)
    bars.start("Tactic selection", "Building engine", 3)
    assert bars.depth == {"Building engine": 0, "Tactic selection": 1}
    for step in range(3):
        assert bars.step("Tactic selection", step) is True
    assert bars.bars["Tactic selection"].n == 3
    bars.finish("Tactic selection")
    bars.step("Building engine", 1)
    bars.cancel = True
    assert bars.step("Building engine", 1) is False  # TensorRT cancels the build on False
    bars.finish("Building engine")
    assert bars.bars == {} and "Tactic selection" in out.getvalue() and "Building engine" in out.getvalue()


# -- TensorRT missing: the real import failure ---------------------------------------------------

def test_import_hygiene():
    code = ("import sys, dilseg.runtime.trt.build, dilseg.runtime.cli_build, dilseg.runtime.trt.cache, "
            "dilseg.runtime.trt.compat, dilseg.runtime.trt.kernels, dilseg.runtime.trt.runner, "
            "dilseg.runtime.trt.loaders, dilseg.runtime.trt.cuda, dilseg.runtime.trt.deps; "
            "print(sorted(m for m in ('torch', 'tensorrt', 'pycuda', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here; the missing-TensorRT path cannot be exercised")
def test_build_without_tensorrt_says_how_to_install(trt_onnx, tmp_path):
    from dilseg.runtime.trt.build import build_engine

    with pytest.raises(BuildError, match=r"TensorRT is not installed.*pip install 'dilseg\[trt\]'.*JetPack"):
        build_engine(trt_onnx["fixed"], tmp_path / "m.engine", BuildOptions(progress=False))
    assert not (tmp_path / "m.engine").exists()


# -- the CLI, as a user runs it -----------------------------------------------------------------------

def dilseg(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "dilseg.runtime.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def test_cli_help_teaches():
    r = dilseg("build", "--help")
    assert r.returncode == 0
    for text in ("examples:", "--min 1x3x256x320", "--timing-cache", "--dla-core", "--hardware-compatible",
                 "TensorRT 11 is strongly typed"):
        assert text in r.stdout


@pytest.mark.parametrize("case,message", [
    ("missing", "missing.onnx: no such file"),
    ("text", "not an ONNX model"),
    ("engine_in", "already a TensorRT engine"),
    ("bad_shape", "--opt 1x3x64: expected 4 dimensions"),
    ("fixed_shape", "fixed input 1x3x64x96"),
    ("bad_output", "the output must end in .engine or .plan"),
    ("no_folder", "folder nowhere does not exist"),
])
def test_cli_errors(case, message, trt_onnx, tmp_path):
    (tmp_path / "readme.onnx").write_text("not a model\n")
    (tmp_path / "old.engine").write_bytes(b"\x00" * 64)
    args = {
        "missing": ["missing.onnx", "-o", "m.engine"],
        "text": ["readme.onnx", "-o", "m.engine"],
        "engine_in": ["old.engine", "-o", "m.engine"],
        "bad_shape": [trt_onnx["dynamic"], "-o", "m.engine", "--opt", "1x3x64"],
        "fixed_shape": [trt_onnx["fixed"], "-o", "m.engine", "--min", "1x3x32x32", "--opt", "1x3x64x64",
                        "--max", "1x3x128x128"],
        "bad_output": [trt_onnx["fixed"], "-o", "m.trt"],
        "no_folder": [trt_onnx["fixed"], "-o", "nowhere/m.engine"],
    }[case]
    r = dilseg("build", *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("dilseg build: error: ") and message in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "m.engine").exists()


def test_cli_refuses_cpu_int8(int8_onnx, tmp_path):
    r = dilseg("build", int8_onnx["cpu"], "-o", tmp_path / "m.engine")
    assert r.returncode == 2 and "'cpu' flavour" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_cli_without_tensorrt(trt_onnx, tmp_path):
    r = dilseg("build", trt_onnx["fixed"], "-o", tmp_path / "m.engine")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "TensorRT is not installed" in r.stderr and "dilseg[trt]" in r.stderr and "JetPack" in r.stderr
    assert "building" in r.stderr  # the request was validated and announced before TensorRT was needed
    assert not (tmp_path / "m.engine").exists()
