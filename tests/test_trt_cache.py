"""Engine sidecar and cache logic: real files, no TensorRT needed (engine bytes are opaque here)."""

import json

import pytest

from dilseg.runtime.artifact import read_meta, sidecar_path
from dilseg.runtime.dataset import CAMVID_CLASSES, CAMVID_IGNORE, CAMVID_PALETTE
from dilseg.runtime.trt.cache import (CacheKey, EngineError, RunningFacts, cached_engine_path, check_engine, decide,
                                         load_sidecar, make_sidecar, verify_engine_file, write_engine)
from dilseg.runtime.files import atomic_write_bytes, sha256_file
from dilseg.runtime.metadata import ModelMeta

META = ModelMeta(model="edge_s", classes=CAMVID_CLASSES, palette=CAMVID_PALETTE, input_size=(64, 96),
                 ignore_index=CAMVID_IGNORE, extra={"note": "test"})
PROFILE = {"input": "input", "min": [1, 3, 64, 96], "opt": [1, 3, 64, 96], "max": [1, 3, 64, 96]}
ONNX_SHA = "a" * 64
HERE = RunningFacts("10.3.0", "Orin", (8, 7))


def fake_engine(tmp_path, payload=b"serialized-engine-bytes" * 100, **facts):
    """An engine file plus a sidecar written by the real writer (the bytes are opaque to the cache)."""
    import hashlib

    engine = tmp_path / "m.engine"
    side = make_sidecar(META, **{"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7",
                                 "precision": "fp16", "profile": PROFILE, "onnx_sha256": ONNX_SHA,
                                 "engine_sha256": hashlib.sha256(payload).hexdigest(), "engine_size": len(payload),
                                 "build_seconds": 12.5, **facts})
    write_engine(engine, payload, side)
    return engine, side


def key(**changes):
    base = dict(onnx_sha256=ONNX_SHA, tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7",
                precision="fp16", profile=PROFILE, dla_core=None)
    base.update(changes)
    return CacheKey(**base)


def test_sidecar_round_trip(tmp_path):
    engine, side = fake_engine(tmp_path)
    path = sidecar_path(engine)
    assert path.name == "m.engine.json" and oct(path.stat().st_mode & 0o777) != oct(0o600)
    loaded = load_sidecar(engine)
    assert loaded == json.loads(json.dumps(side))
    for k in ("tensorrt_version", "gpu_name", "compute_capability", "precision", "profile", "onnx_sha256",
              "hardware_compatible", "version_compatible", "dla_core", "built_at", "engine_sha256"):
        assert k in loaded
    # `dilseg info` reads the model metadata through artifact.read_meta, unchanged.
    assert read_meta(engine) == META
    assert sha256_file(engine) == side["engine_sha256"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "x.engine"
    atomic_write_bytes(target, b"old")

    def failing_write():
        from dilseg.runtime.files import atomic_write

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("disk full")

        atomic_write(target, write)

    with pytest.raises(RuntimeError, match="disk full"):
        failing_write()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.engine"]  # no .part left behind


def test_atomic_write_into_missing_folder(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        atomic_write_bytes(tmp_path / "nope" / "x.engine", b"1")


def test_missing_and_corrupt_sidecars(tmp_path):
    engine, _ = fake_engine(tmp_path)
    side = sidecar_path(engine)
    side.write_text("{not json")
    with pytest.raises(EngineError, match="corrupt sidecar"):
        load_sidecar(engine)
    side.write_text(json.dumps({"meta": META.to_dict()}))
    with pytest.raises(EngineError, match="sidecar lacks tensorrt_version, gpu_name"):
        load_sidecar(engine)
    side.unlink()
    with pytest.raises(EngineError, match="no sidecar m.engine.json.*dilseg build"):
        load_sidecar(engine)


def test_truncated_or_replaced_engine(tmp_path):
    engine, side = fake_engine(tmp_path)
    data = engine.read_bytes()
    engine.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match="truncated or was replaced"):
        verify_engine_file(engine, side)
    engine.write_bytes(data[:-1] + b"X")  # same size, different bytes
    with pytest.raises(EngineError, match="sha256 .* differs"):
        verify_engine_file(engine, side)


def test_foreign_engine_named_precisely(tmp_path):
    engine, _ = fake_engine(tmp_path)
    assert check_engine(engine, HERE)["precision"] == "fp16"
    with pytest.raises(EngineError, match="built with TensorRT 10.3.0, this is TensorRT 11.4.0"):
        check_engine(engine, RunningFacts("11.4.0", "Orin", (8, 7)))
    with pytest.raises(EngineError, match=r"built for Orin \(compute capability 8.7\), this GPU is NVIDIA H200 \(9.0\)"):
        check_engine(engine, RunningFacts("10.3.0", "NVIDIA H200", (9, 0)))


def test_compatible_engine_accepted_elsewhere(tmp_path):
    engine, _ = fake_engine(tmp_path, version_compatible=True, hardware_compatible=True)
    check_engine(engine, RunningFacts("10.8.0", "NVIDIA L4", (8, 9)))


def test_cache_reuses_identical_build(tmp_path):
    engine, _ = fake_engine(tmp_path)
    d = decide(engine, key())
    assert d.reuse and d.reasons == [] and "reusing cached engine" in str(d)


@pytest.mark.parametrize("change,reason", [
    (dict(onnx_sha256="b" * 64), "the ONNX changed (sha256 aaaaaaaaaaaa… -> bbbbbbbbbbbb…)"),
    (dict(tensorrt_version="10.13.0"), "TensorRT changed (10.3.0 -> 10.13.0)"),
    (dict(gpu_name="NVIDIA GeForce RTX 4090", compute_capability="8.9"),
     "the GPU changed (Orin 8.7 -> NVIDIA GeForce RTX 4090 8.9)"),
    (dict(precision="fp32"), "the precision changed (fp16 -> fp32)"),
    (dict(profile={"input": "input", "min": [1, 3, 64, 64], "opt": [1, 3, 128, 128], "max": [1, 3, 256, 256]}),
     "the shape profile changed (input 1x3x64x96 -> input min 1x3x64x64 opt 1x3x128x128 max 1x3x256x256)"),
    (dict(dla_core=0), "the DLA core changed (None -> 0)"),
    (dict(version_compatible=True), "version-compatible changed (off -> on)"),
    (dict(hardware_compatible=True), "hardware-compatible changed (off -> on)"),
])
def test_cache_rebuilds_with_reason(tmp_path, change, reason):
    engine, _ = fake_engine(tmp_path)
    d = decide(engine, key(**change))
    assert not d.reuse and d.reasons == [reason]
    assert str(d) == f"building {engine}: {reason}"


def test_cache_rebuilds_missing_or_damaged(tmp_path):
    d = decide(tmp_path / "none.engine", key())
    assert not d.reuse and d.reasons == ["no cached engine yet"]
    engine, _ = fake_engine(tmp_path)
    with open(engine, "ab") as f:
        f.write(b"trailing")
    d = decide(engine, key())
    assert not d.reuse and "the cached engine is unusable" in d.reasons[0] and "sidecar says" in d.reasons[0]


def test_several_changes_all_reported(tmp_path):
    engine, _ = fake_engine(tmp_path)
    d = decide(engine, key(tensorrt_version="11.4.0", precision="int8"))
    assert len(d.reasons) == 2


def test_cache_location(tmp_path, monkeypatch):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"x")
    assert cached_engine_path(onnx, "c" * 64, "fp16") == tmp_path / "model.fp16.engine"
    # A model in a folder this user cannot write (e.g. shipped inside site-packages) caches per user.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert cached_engine_path(onnx, "c" * 64, "fp32", writable=False) == \
        tmp_path / "cache" / "dilseg" / "engines" / "model-cccccccccccc.fp32.engine"
