"""ONNX export: metadata, onnx.checker, ONNX Runtime parity, and the errors users hit."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dilseg.export.onnx_export import ExportError, export_onnx, parse_size, verification_inputs, with_logits_output
from dilseg.runtime.classes import PRESETS
from dilseg.export.weights import WeightsError, load_model, load_weights, save_weights
from dilseg.runtime.files import sha256_file
from dilseg.export.zoo import create_model
from dilseg.runtime.artifact import read_meta, read_onnx_meta
from dilseg.runtime.dataset import CAMVID_CLASSES, CAMVID_PALETTE
from dilseg.runtime.metadata import METADATA_KEY


def dilseg(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dilseg.runtime.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def trained_weights(tmp_path_factory) -> Path:
    """edge_s weights with non-trivial BatchNorm statistics (a few train-mode passes)."""
    torch.manual_seed(1)
    model = create_model("edge_s").train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(2, 3, 64, 96) * 2 - 1)
    path = tmp_path_factory.mktemp("w") / "edge_s.safetensors"
    save_weights(model, path, "edge_s", CAMVID_CLASSES)
    return path


def test_cli_export_writes_self_describing_verified_onnx(tmp_path, trained_weights) -> None:
    out = tmp_path / "m.onnx"
    r = dilseg("export", "onnx", "--weights", str(trained_weights), "--size", "64x96", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "argmax agreement" in r.stdout
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props[METADATA_KEY])
    assert meta["model"] == "edge_s"
    assert meta["classes"] == list(CAMVID_CLASSES)
    assert [tuple(c) for c in meta["palette"]] == list(CAMVID_PALETTE)
    assert meta["input_size"] == [64, 96] and meta["layout"] == "NCHW" and meta["color_order"] == "RGB"
    assert meta["output_kind"] == "labels" and meta["dilseg_version"]
    assert meta["weights_sha256"] == sha256_file(trained_weights)
    assert len(meta["mean"]) == 3 and len(meta["std"]) == 3
    # Labels, not logits, cross the bus: one int32 NxHxW output.
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (output,) = sess.get_outputs()
    assert output.type == "tensor(int32)" and output.shape == [1, 64, 96]


def test_exported_labels_match_pytorch(tmp_path, trained_weights) -> None:
    model, _ = load_model(trained_weights)
    meta = PRESETS["camvid"].model_meta("edge_s", (64, 96))
    export_onnx(model, meta, tmp_path / "m.onnx", (64, 96), head="full")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    model.eval()
    for x in verification_inputs(meta, (64, 96), n=2, seed=5):
        labels = sess.run(None, {"input": x})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).argmax(1).numpy()
        assert (labels == ref).mean() > 0.999


def test_dynamic_export_runs_at_other_sizes(tmp_path, trained_weights) -> None:
    model, _ = load_model(trained_weights)
    export_onnx(model, PRESETS["camvid"].model_meta("edge_s"), tmp_path / "d.onnx", None)
    assert read_meta(tmp_path / "d.onnx").input_size is None
    sess = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    for h, w in [(48, 64), (120, 160)]:
        out = sess.run(None, {"input": np.zeros((2, 3, h, w), np.float32)})[0]
        assert out.shape == (2, h, w) and out.dtype == np.int32


def test_logits_export(tmp_path) -> None:
    r = dilseg("export", "onnx", "--model", "edge_s", "--size", "64x96", "--output-kind", "logits", "-o", str(tmp_path / "l.onnx"))
    assert r.returncode == 0, r.stderr
    sess = ort.InferenceSession(str(tmp_path / "l.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_outputs()[0].shape == [1, 11, 64, 96]
    assert read_meta(tmp_path / "l.onnx").output_kind == "logits"


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet9000", "--size", "64x96"], "unknown model 'resnet9000'"),
    (["--model", "edge_s", "--size", "60x96"], "multiples of 8"),
    (["--model", "edge_s", "--size", "big"], "HxW"),
    (["--model", "edge_s", "--size", "64x96", "--opset", "9"], "opset"),
])
def test_bad_export_input_is_a_clear_error_and_writes_nothing(tmp_path, args, message) -> None:
    out = tmp_path / "x.onnx"
    r = dilseg("export", "onnx", *args, "-o", str(out))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_a_clear_error(tmp_path) -> None:
    r = dilseg("export", "onnx", "--model", "edge_s", "--size", "64x96", "-o", str(tmp_path / "missing" / "x.onnx"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_weights_for_another_class_count_are_refused(tmp_path, trained_weights) -> None:
    other = create_model("edge_s", num_classes=5)
    path = tmp_path / "five.safetensors"
    save_weights(other, path, "edge_s", [f"c{i}" for i in range(5)])
    with pytest.raises(WeightsError, match="5 classes"):
        load_weights(create_model("edge_s", 11), path, num_classes=11)
    # The CLI builds the 5-class model the file names and labels it with the header's classes
    # (colours generated where training recorded none); other classes for it are refused.
    r = dilseg("export", "onnx", "--weights", str(path), "--size", "64x96", "-o", str(tmp_path / "x.onnx"))
    assert r.returncode == 0, r.stderr
    meta = read_onnx_meta(tmp_path / "x.onnx")
    assert meta.classes == tuple(f"c{i}" for i in range(5)) and len(set(meta.palette)) == 5
    r = dilseg("export", "onnx", "--weights", str(path), "--classes", "camvid", "--size", "64x96",
               "-o", str(tmp_path / "y.onnx"))
    assert r.returncode == 2 and "lists 11 classes" in r.stderr and not (tmp_path / "y.onnx").exists()


def test_weights_for_another_model_name_the_mismatch(tmp_path, trained_weights) -> None:
    with pytest.raises(WeightsError, match="does not fit this model.*edge_s.*shape mismatches"):
        load_weights(create_model("edge_m"), trained_weights)
    r = dilseg("export", "onnx", "--model", "edge_m", "--weights", str(trained_weights), "--size", "64x96",
               "-o", str(tmp_path / "x.onnx"))
    assert r.returncode == 2 and "does not fit" in r.stderr and not (tmp_path / "x.onnx").exists()


def test_corrupt_weights_file(tmp_path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_model(bad)


def test_weights_round_trip(tmp_path, trained_weights) -> None:
    model, info = load_model(trained_weights)
    assert info["model"] == "edge_s" and info["classes"] == list(CAMVID_CLASSES)
    fresh = create_model("edge_s")
    load_weights(fresh, trained_weights, 11)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_verification_failure_writes_nothing(tmp_path) -> None:
    model = create_model("edge_s")
    with pytest.raises(ExportError, match="disagrees"):
        # An impossible tolerance: the check must refuse and leave no file behind.
        export_onnx(model, PRESETS["camvid"].model_meta("edge_s"), tmp_path / "x.onnx", (64, 96), max_abs_diff=0.0, min_agreement=100.1)
    assert list(tmp_path.iterdir()) == []


def test_parse_size() -> None:
    assert parse_size("360x480") == (360, 480)
    with pytest.raises(ExportError):
        parse_size("0x8")


@pytest.mark.parametrize("head, block", [("full", 1), ("half", 2), ("quarter", 4)])
def test_head_labels_are_the_paper_heads_logits_averaged_over_each_block(tmp_path, trained_weights, head, block) -> None:
    """Bilinear x(8/block) with half-pixel centres samples the x8 field at each block's centre,
    which is the mean of the x8 logits over the block: the reduced heads give every block the
    label of the paper's head averaged over it."""
    model, _ = load_model(trained_weights)
    meta = PRESETS["camvid"].model_meta("edge_s", (64, 96))
    export_onnx(model, meta, tmp_path / "m.onnx", (64, 96), head=head)
    assert read_meta(tmp_path / "m.onnx").extra["head"] == head
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    model.eval()
    for x in verification_inputs(meta, (64, 96), n=2, seed=7):
        labels = sess.run(None, {"input": x})[0]
        with torch.no_grad():
            pooled = torch.nn.functional.avg_pool2d(model(torch.from_numpy(x)), block)
        want = pooled.argmax(1).numpy().repeat(block, 1).repeat(block, 2)
        assert labels.shape == (1, 64, 96) and labels.dtype == np.int32
        assert (labels == want).mean() > 0.999


def test_eighth_head_repeats_the_stride_8_labels(tmp_path, trained_weights) -> None:
    model, _ = load_model(trained_weights)
    meta = PRESETS["camvid"].model_meta("edge_s", (64, 96))
    export_onnx(model, meta, tmp_path / "m.onnx", (64, 96), head="eighth")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = verification_inputs(meta, (64, 96), n=1, seed=3)[0]
    with torch.no_grad():
        want = model.eval().scores(torch.from_numpy(x)).argmax(1).numpy().repeat(8, 1).repeat(8, 2)
    assert np.array_equal(sess.run(None, {"input": x})[0], want)


def test_default_head_is_half_for_zoo_models_and_the_reduced_head_is_cheaper(tmp_path, trained_weights) -> None:
    model, _ = load_model(trained_weights)
    meta = PRESETS["camvid"].model_meta("edge_s", (64, 96))
    export_onnx(model, meta, tmp_path / "default.onnx", (64, 96))
    export_onnx(model, meta, tmp_path / "full.onnx", (64, 96), head="full")
    assert read_meta(tmp_path / "default.onnx").extra["head"] == "half"
    assert read_meta(tmp_path / "full.onnx").extra["head"] == "full"

    def argmax_input_shape(path: Path) -> tuple[int, ...]:
        proto = with_logits_output(onnx.load(str(path)))  # the ArgMax's input as a second output
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"input": np.zeros((1, 3, 64, 96), np.float32)})[-1].shape

    # The ArgMax (and the bilinear Resize feeding it) works on a quarter of the pixels.
    assert argmax_input_shape(tmp_path / "full.onnx") == (1, 11, 64, 96)
    assert argmax_input_shape(tmp_path / "default.onnx") == (1, 11, 32, 48)


def test_cli_head_option(tmp_path, trained_weights) -> None:
    out = tmp_path / "x8.onnx"
    r = dilseg("export", "onnx", "--weights", str(trained_weights), "--size", "64x96", "--head", "full", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert read_meta(out).extra["head"] == "full"
    r = dilseg("export", "onnx", "--weights", str(trained_weights), "--size", "64x96", "--head", "huge", "-o", str(out))
    assert r.returncode == 2 and "invalid choice: 'huge'" in r.stderr


def test_dynamic_reduced_head_crops_to_sizes_that_are_not_multiples_of_8(tmp_path, trained_weights) -> None:
    model, _ = load_model(trained_weights)
    export_onnx(model, PRESETS["camvid"].model_meta("edge_s"), tmp_path / "d.onnx", None, head="half")
    sess = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    for h, w in [(64, 96), (50, 70)]:
        assert sess.run(None, {"input": np.zeros((1, 3, h, w), np.float32)})[0].shape == (1, h, w)


class _OwnUpsampling(torch.nn.Module):
    """A network ending in its own upsampling, with no scores() to start a reduced head from."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 11, 3, stride=8, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(self.conv(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_models_without_scores_keep_their_own_head(tmp_path) -> None:
    meta = PRESETS["camvid"].model_meta("edge_s", (64, 96))
    export_onnx(_OwnUpsampling(), meta, tmp_path / "own.onnx", (64, 96))
    assert read_meta(tmp_path / "own.onnx").extra["head"] == "full"
    with pytest.raises(ExportError, match=r"scores\(\).*--head full"):
        export_onnx(_OwnUpsampling(), meta, tmp_path / "half.onnx", (64, 96), head="half")
    with pytest.raises(ExportError, match="logits are always upsampled"):
        export_onnx(create_model("edge_s"), replace(meta, output_kind="logits"), tmp_path / "l.onnx", (64, 96),
                    head="half")
    assert not (tmp_path / "half.onnx").exists() and not (tmp_path / "l.onnx").exists()


def test_cli_head_choices_are_the_exporters() -> None:
    from dilseg.export.heads import HEADS

    r = dilseg("export", "onnx", "--help")
    assert all(name in r.stdout for name in HEADS)
    assert "{" + ",".join(HEADS) + "}" in r.stdout


def test_pytorch_backend_runs_channels_last_with_the_same_labels(trained_weights) -> None:
    from dilseg.runtime.backends import open_backend

    x = verification_inputs(PRESETS["camvid"].model_meta("edge_s", (64, 96)), (64, 96), n=1, seed=11)[0]
    fast = open_backend(trained_weights, input_size=(64, 96), head="half")
    plain = open_backend(trained_weights, input_size=(64, 96), head="half", channels_last=False)
    try:
        assert fast.options.channels_last  # the default
        conv = next(m for m in fast.model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert np.array_equal(fast.infer(x), plain.infer(x))
    finally:
        fast.close()
        plain.close()
