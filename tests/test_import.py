"""`dilseg import` on real segmentation networks no one here wrote (Hugging Face SegFormer and
UPerNet/ConvNeXt, random weights), each exported by the user's plain `torch.onnx.export`, then
run through run/eval/verify/info; and every bad input refused in one line with nothing written.

The adopted graph is compared with PyTorch itself (upsampled logits, argmax) on CamVid frames,
not only with the checks `dilseg import` makes on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import foreign_models as fm  # noqa: E402
from precision_helpers import CAMVID, needs_camvid  # noqa: E402

from dilseg.runtime.artifact import read_onnx_meta  # noqa: E402
from dilseg.runtime.backends import open_backend  # noqa: E402
from dilseg.runtime.classes import PRESETS  # noqa: E402
from dilseg.runtime.cli import main  # noqa: E402
from dilseg.runtime.dataset import list_images  # noqa: E402
from dilseg.runtime.preprocess import preprocess  # noqa: E402
from dilseg.runtime.segmenter import Segmenter  # noqa: E402

SIZE = (64, 96)
pytestmark = [needs_camvid, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("foreign")


def seeded_and_saved(build, seed: int, path: Path):
    """A foreign model built under ``seed``, made lively at SIZE, its state dict saved to ``path``."""
    torch.manual_seed(seed)
    model = fm.lively(build(), SIZE)
    torch.save(model.state_dict(), path)
    return model


@pytest.fixture(scope="module")
def segformer(work):
    return seeded_and_saved(fm.segformer, 0, work / "segformer.pt")


@pytest.fixture(scope="module")
def segformer_onnx(segformer, work) -> Path:
    return fm.user_export(fm.Logits(segformer), work / "segformer.onnx", SIZE)


@pytest.fixture(scope="module")
def upernet(work):
    return seeded_and_saved(fm.upernet, 1, work / "upernet.pt")


def camvid_frames(n: int = 3) -> list[np.ndarray]:
    paths = list_images(CAMVID / "val" / "images")
    return [cv2.imread(str(p)) for p in paths[:: len(paths) // n][:n]]


def torch_labels(model, frame: np.ndarray, meta) -> np.ndarray:
    """PyTorch's own answer: logits upsampled bilinearly to the input size, argmax."""
    x = torch.from_numpy(preprocess(frame, meta))
    with torch.no_grad():
        logits = model(pixel_values=x).logits
        logits = torch.nn.functional.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].numpy()


def agreement_with_torch(model, adopted: Path) -> tuple[float, int]:
    backend = open_backend(adopted)
    try:
        same = total = 0
        classes = set()
        for frame in camvid_frames():
            x = preprocess(frame, backend.meta)
            got = backend.infer(x)[0]
            want = torch_labels(model, frame, backend.meta)
            same += int((got == want).sum())
            total += want.size
            classes |= set(np.unique(want).tolist())
        return 100.0 * same / total, len(classes)
    finally:
        backend.close()


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_segformer_imported_runs_evaluates_and_verifies(segformer, segformer_onnx, work, capsys) -> None:
    out = work / "segformer_dilseg.onnx"
    rc, stdout, stderr = run_cli(capsys, "import", segformer_onnx, "-o", out, "--classes", "camvid",
                                 "--frames", CAMVID)
    assert rc == 0, stderr
    assert "1/4 of the input size" in stderr and "real frames" in stdout
    meta = read_onnx_meta(out)
    assert meta.classes == PRESETS["camvid"].names and meta.palette == PRESETS["camvid"].palette
    assert meta.input_size == SIZE and meta.output_kind == "labels" and meta.ignore_index == 11
    assert meta.extra["imported"]["output_stride"] == 4
    graph = onnx.load(str(out))
    assert [n.op_type for n in graph.graph.node][-4:] == ["Resize", "ArgMax", "Cast", "Identity"]
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.INT32
    agree, seen = agreement_with_torch(segformer, out)
    assert agree >= 99.9 and seen >= 3  # a mask of one class would agree vacuously

    masks = work / "seg_masks"
    rc, stdout, stderr = run_cli(capsys, "run", "--model", out, "--source", CAMVID / "val" / "images",
                                 "--max-frames", 3, "--labels", masks, "--quiet")
    assert rc == 0, stderr
    seg = Segmenter(open_backend(out))
    first = cv2.imread(str(list_images(CAMVID / "val" / "images")[0]))
    assert np.array_equal(cv2.imread(str(sorted(masks.iterdir())[0]), cv2.IMREAD_UNCHANGED), seg(first).labels)

    rc, stdout, stderr = run_cli(capsys, "eval", "--model", out, "--data", CAMVID, "--limit", 2, "--no-progress",
                                 "--json", work / "eval.json")
    assert rc == 0, stderr
    assert json.loads((work / "eval.json").read_text())["images"] == 2 and "Bicyclist" in stdout

    logits = work / "segformer_logits.onnx"
    assert run_cli(capsys, "import", segformer_onnx, "-o", logits, "--classes", "camvid",
                   "--output-kind", "logits")[0] == 0
    rc, stdout, stderr = run_cli(capsys, "verify", out, logits, "--data", CAMVID, "--limit", 2, "--no-progress",
                                 "--min-agreement", 99.9)
    assert rc == 0, stderr
    assert "PASS" in stdout

    rc, stdout, _ = run_cli(capsys, "info", out)
    assert rc == 0 and "Bicyclist" in stdout


def test_upernet_at_full_resolution_and_its_own_classes_file(upernet, work, capsys) -> None:
    src = fm.user_export(fm.Logits(upernet), work / "upernet.onnx", SIZE)
    classes = work / "classes.txt"
    names = ["traffic light"] + [f"thing_{i}" for i in range(1, 11)]  # names may hold spaces
    classes.write_text("# my classes\n" + "\n".join(f"{n} 10 {20 * i} 30" if i % 2 else n
                                                    for i, n in enumerate(names)) + "\nignore_index: 255\n")
    out = work / "upernet_dilseg.onnx"
    rc, stdout, stderr = run_cli(capsys, "import", src, "-o", out, "--classes", classes, "--frames", CAMVID,
                                 "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25")
    assert rc == 0, stderr
    meta = read_onnx_meta(out)
    assert list(meta.classes) == names and meta.ignore_index == 255
    assert meta.palette[1] == (10, 20, 30) and len(set(meta.palette)) == 11  # generated ones distinct
    assert meta.mean == (0.5, 0.5, 0.5) and meta.extra["imported"]["output_stride"] == 1
    assert "Resize" not in [n.op_type for n in onnx.load(str(out)).graph.node][-3:]
    agree, seen = agreement_with_torch(upernet, out)
    assert agree >= 99.9 and seen >= 2


def test_dynamic_graph_needs_a_size_or_dynamic_and_runs_at_any_size(segformer, work, capsys) -> None:
    src = fm.user_export(fm.Logits(segformer), work / "segformer_dyn.onnx", SIZE, dynamic=True, dynamo=False)
    out = work / "dyn_dilseg.onnx"
    rc, _, stderr = run_cli(capsys, "import", src, "-o", out, "--classes", "camvid")
    assert rc == 2 and "--size HxW" in stderr and "--dynamic" in stderr and not out.exists()
    rc, _, stderr = run_cli(capsys, "import", src, "-o", out, "--classes", "camvid", "--dynamic", "--frames", CAMVID)
    assert rc == 0, stderr
    backend = open_backend(out)
    assert backend.meta.input_size is None
    frame = camvid_frames(1)[0]
    assert Segmenter(backend)(frame).labels.shape == frame.shape[:2]
    x = preprocess(frame, backend.meta)  # 360x480: the frame's own size
    want = torch_labels(segformer, frame, backend.meta)
    assert (backend.infer(x)[0] == want).mean() >= 0.999
    from dilseg.runtime.trt.build import BuildOptions, prepare

    assert prepare(out, work / "dyn.engine", BuildOptions()).default_profile  # 256x320 .. 720x1280 for TensorRT
    fixed = work / "dyn_fixed.onnx"
    assert run_cli(capsys, "import", src, "-o", fixed, "--classes", "camvid", "--size", "128x160")[0] == 0
    assert read_onnx_meta(fixed).input_size == (128, 160)


@pytest.mark.parametrize("opset", [17])
def test_labels_output_at_a_stride_is_upsampled_nearest(segformer, work, capsys, opset) -> None:
    src = fm.user_export(fm.Labels(segformer), work / f"labels{opset}.onnx", SIZE, dynamo=False,
                         output_names=["labels"], opset=opset)
    out = work / f"labels{opset}_dilseg.onnx"
    rc, stdout, stderr = run_cli(capsys, "import", src, "-o", out, "--classes", "camvid", "--frames", CAMVID)
    assert rc == 0, stderr
    assert "integer labels" in stderr
    backend = open_backend(out)
    frame = camvid_frames(1)[0]
    x = preprocess(frame, backend.meta)
    with torch.no_grad():
        small = segformer(pixel_values=torch.from_numpy(x)).logits.argmax(1)[0].numpy()
    assert np.array_equal(backend.infer(x)[0], np.repeat(np.repeat(small, 4, 0), 4, 1))


def test_several_outputs_need_output_name(segformer, work, capsys) -> None:
    class Two(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            logits = self.m(pixel_values=x).logits
            return logits, logits.mean((2, 3))

    src = fm.user_export(Two(segformer), work / "two.onnx", SIZE, dynamo=False, output_names=["seg", "cls"])
    out = work / "two_dilseg.onnx"
    rc, _, stderr = run_cli(capsys, "import", src, "-o", out, "--classes", "camvid")
    assert rc == 2 and "--output NAME" in stderr and "'seg'" in stderr and not out.exists()
    rc, _, stderr = run_cli(capsys, "import", src, "-o", out, "--classes", "camvid", "--output", "seg")
    assert rc == 0, stderr
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["labels"]


def _broken_graph(path: Path) -> Path:
    """A graph that onnx.checker rejects: a node reads a tensor nothing produces."""
    from onnx import TensorProto, helper

    node = helper.make_node("Add", ["pixel_values", "missing"], ["logits"])
    graph = helper.make_graph([node], "broken", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                                                               [1, 3, 64, 96])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 64, 96])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


BAD = {
    "classifier": (lambda w: fm.user_export(fm.classifier(), w / "cls.onnx", SIZE), "camvid", "classifier"),
    "detector": (lambda w: fm.user_export(fm.Detector().eval(), w / "det.onnx", SIZE, dynamo=False,
                                          output_names=["boxes", "scores", "classes"]), "camvid", "detector"),
    "count": (lambda w: w / "segformer.onnx", "cityscapes", "has 11 classes but cityscapes lists 19"),
    "malformed": (lambda w: w / "segformer.onnx", "bad.txt", "three colour values"),
    "duplicate": (lambda w: w / "segformer.onnx", "dup.json", "duplicate class name 'Road' (class 0 is 'road')"),
    "gray": (lambda w: fm.user_export(fm.Gray().eval(), w / "gray.onnx", SIZE), "camvid", "3-channel"),
    "checker": (_broken_graph, "camvid", "fails onnx.checker"),
    "stride": (lambda w: fm.user_export(fm.odd_stride(), w / "odd.onnx", SIZE), "camvid", "integer stride"),
    "yaml": (lambda w: w / "segformer.onnx", "bad.yaml", "not valid YAML"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_are_refused_in_one_line_and_nothing_is_written(case, segformer_onnx, work, capsys) -> None:
    make, classes, phrase = BAD[case]
    (work / "bad.txt").write_text("road 128 64\nsky\n")
    (work / "dup.json").write_text(json.dumps([{"name": "road", "color": [1, 2, 3]}, "sky", {"name": "Road"}]))
    (work / "bad.yaml").write_text("- name: road\n  color: [1, 2\n")
    src = make(work) if case != "checker" else make(work / "broken.onnx")
    if classes.endswith((".txt", ".json", ".yaml")):
        classes = work / classes
    out = work / f"refused_{case}.onnx"
    before = src.read_bytes()
    rc, stdout, stderr = run_cli(capsys, "import", src, "-o", out, "--classes", classes)
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dilseg import: error: ") and phrase in lines[0], stderr
    assert not out.exists() and not list(work.glob(f".refused_{case}*"))
    assert src.read_bytes() == before  # the input is never touched


def test_a_foreign_onnx_given_to_run_gets_the_import_command(segformer_onnx, capsys) -> None:
    rc, _, stderr = run_cli(capsys, "run", "--model", segformer_onnx, "--source", "test://", "--max-frames", 1)
    assert rc == 2
    assert f"dilseg import {segformer_onnx} -o " in stderr and "--classes camvid" in stderr


def test_import_help_teaches_with_examples(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["import", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "dilseg import " in out and "ignore_index: 255" in out


FACTORIES = str(Path(fm.__file__))  # tests/foreign_models.py, given as a file path like a user's script


@pytest.mark.parametrize("precision, floor", [("fp16", 99.0), ("int8", 90.0)])
def test_torch_factory_precision_variants_match_pytorch(segformer, work, capsys, precision, floor) -> None:
    out = work / f"segformer_torch_{precision}.onnx"
    rc, stdout, stderr = run_cli(capsys, "export", "onnx", "--torch", f"{FACTORIES}:segformer", "--kwargs",
                                 '{"num_labels": 11}', "--weights", work / "segformer.pt", "--classes", "camvid",
                                 "--size", "64x96", "--precision", precision, "--target", "cpu",
                                 "--calib-dir", CAMVID / "train", "--calib-images", 4, "-o", out)
    assert rc == 0, stderr
    meta = read_onnx_meta(out)
    assert meta.model == "segformer" and meta.classes == PRESETS["camvid"].names and meta.input_size == SIZE
    assert meta.extra["torch"]["output_stride"] == 4 and meta.weights_sha256 and meta.precision == precision
    agree, seen = agreement_with_torch(segformer, out)
    assert agree >= floor and seen >= 3


def test_torch_factory_by_module_name_with_safetensors(upernet, work, capsys) -> None:
    from safetensors.torch import save_file

    weights = work / "upernet.safetensors"
    save_file({k: v.contiguous() for k, v in upernet.state_dict().items()}, str(weights))
    out = work / "upernet_torch.onnx"
    args = ["export", "onnx", "--torch", "foreign_models:upernet", "--weights", weights, "--classes", "camvid"]
    # Its pyramid pooling (bins 1, 2, 3, 6 of the stride-32 map) is beyond the TorchScript exporter at 64x96:
    rc, _, stderr = run_cli(capsys, *args, "--size", "64x96", "-o", out)
    assert rc == 2 and "torch.onnx.export cannot export this module" in stderr and not out.exists()
    rc, stdout, stderr = run_cli(capsys, *args, "--size", "192x384", "-o", out)
    assert rc == 0, stderr
    meta = read_onnx_meta(out)
    assert meta.precision == "fp32" and meta.extra["torch"]["output_stride"] == 1 and meta.input_size == (192, 384)
    agree, _ = agreement_with_torch(upernet, out)
    assert agree >= 99.9


def test_torch_factory_dynamic_export_runs_at_the_frame_size(segformer, work, capsys) -> None:
    out = work / "segformer_torch_dyn.onnx"
    rc, _, stderr = run_cli(capsys, "export", "onnx", "--torch", f"{FACTORIES}:segformer", "--weights",
                            work / "segformer.pt", "--classes", "camvid", "--dynamic", "-o", out)
    assert rc == 0, stderr
    backend = open_backend(out)
    assert backend.meta.input_size is None
    frame = camvid_frames(1)[0]
    x = preprocess(frame, backend.meta)
    assert x.shape[2:] == (360, 480)
    assert (backend.infer(x)[0] == torch_labels(segformer, frame, backend.meta)).mean() >= 0.999


@pytest.mark.parametrize("factory, pick", [("segformer_dict", []), ("segformer_tuple", ["--torch-output", "1"])])
def test_torch_factory_outputs_as_dict_or_tuple(factory, pick, work, capsys) -> None:
    out = work / f"{factory}.onnx"
    rc, _, stderr = run_cli(capsys, "export", "onnx", "--torch", f"{FACTORIES}:{factory}", *pick, "--classes",
                            "camvid", "--size", "64x96", "-o", out)
    assert rc == 0, stderr
    reference = fm.Logits(getattr(fm, factory)().model)  # the same seed: the same weights
    agree, seen = agreement_with_torch(reference.model, out)
    assert agree >= 99.9 and seen >= 3


TORCH_BAD = {
    "tuple": (["--torch", f"{FACTORIES}:segformer_tuple"], "pick the scores with --torch-output INDEX"),
    "classifier": (["--torch", f"{FACTORIES}:classifier"], "a classifier"),
    "stride": (["--torch", f"{FACTORIES}:odd_stride"], "integer stride"),
    "count": (["--torch", f"{FACTORIES}:segformer", "--kwargs", '{"num_labels": 5}'], "has 5 classes but camvid lists 11"),
    "factory": (["--torch", f"{FACTORIES}:no_such_factory"], "has no callable 'no_such_factory'"),
    "module": (["--torch", "no_such_package.nets:build"], "cannot import no_such_package.nets"),
    "kwargs": (["--torch", f"{FACTORIES}:segformer", "--kwargs", "{num_labels: 5}"], "not valid JSON"),
    "weights": (["--torch", f"{FACTORIES}:segformer", "--weights", "upernet.pt"], "does not fit this model"),
}


@pytest.mark.parametrize("case", list(TORCH_BAD))
def test_torch_factory_bad_inputs_are_refused_and_nothing_is_written(case, segformer, upernet, work, capsys) -> None:
    args, phrase = TORCH_BAD[case]
    args = [str(work / a) if a.endswith(".pt") else a for a in args]
    out = work / f"refused_torch_{case}.onnx"
    rc, _, stderr = run_cli(capsys, "export", "onnx", *args, "--classes", "camvid", "--size", "64x96", "-o", out)
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and phrase in lines[0], stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def adopted(segformer_onnx, work) -> Path:
    from dilseg.export.onnx_import import adopt, write_adopted

    out = work / "adopted.onnx"
    write_adopted(adopt(segformer_onnx, PRESETS["camvid"], frames=CAMVID), out)
    return out


@pytest.mark.parametrize("precision, target, floor", [("fp16", "tensorrt", 99.0), ("int8", "cpu", 90.0),
                                                      ("int8", "tensorrt", 90.0)])
def test_precision_variants_of_an_imported_graph(adopted, work, capsys, precision, target, floor) -> None:
    out = work / f"adopted_{precision}_{target}.onnx"
    rc, stdout, stderr = run_cli(capsys, "export", "onnx", "--from", adopted, "--precision", precision,
                                 "--target", target, "--calib-dir", CAMVID / "train", "--calib-images", 4, "-o", out)
    assert rc == 0, stderr
    meta = read_onnx_meta(out)
    assert meta.precision == precision and meta.classes == read_onnx_meta(adopted).classes
    assert meta.extra["imported"]["output_stride"] == 4
    if precision == "int8":
        assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node)
    rc, stdout, stderr = run_cli(capsys, "verify", adopted, out, "--data", CAMVID, "--limit", 2, "--no-progress",
                                 "--min-agreement", floor)
    assert rc == 0 and "PASS" in stdout, stdout + stderr


def test_precision_variant_from_refuses_what_it_cannot_use(adopted, segformer_onnx, work, capsys) -> None:
    out = work / "nope.onnx"
    rc, _, stderr = run_cli(capsys, "export", "onnx", "--from", adopted, "--precision", "fp16", "--size", "64x96",
                            "--calib-dir", CAMVID / "train", "-o", out)
    assert rc == 2 and "--size: --from takes everything" in stderr and not out.exists()
    rc, _, stderr = run_cli(capsys, "export", "onnx", "--from", segformer_onnx, "--precision", "fp16",
                            "--calib-dir", CAMVID / "train", "-o", out)
    assert rc == 2 and "dilseg import" in stderr and not out.exists()


def test_tensorrt_build_accepts_the_imported_graph(adopted, work) -> None:
    """Everything of `dilseg build` that needs no GPU: profile, precision, the int8 flavour check."""
    from dilseg.runtime.trt.build import BuildOptions, prepare

    prepared = prepare(adopted, work / "adopted.engine", BuildOptions())
    assert prepared.profile.fixed and prepared.info.meta.extra["imported"]["source"] == "segformer.onnx"
    assert prepared.profile.min == (1, 3, *SIZE)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_imported_graph_builds_and_matches_onnxruntime_on_tensorrt(gpu, adopted, work) -> None:
    from dilseg.runtime.trt.build import BuildOptions, build_engine

    engine = work / "adopted.engine"
    build_engine(adopted, engine, BuildOptions(progress=False))
    with open_backend(engine, backend="tensorrt") as trt, open_backend(adopted) as ort:
        for frame in camvid_frames():
            x = preprocess(frame, ort.meta)
            assert (trt.infer(x) == ort.infer(x)).mean() >= 0.999


def test_demo_page_runs_an_imported_model_by_path_and_by_upload(adopted, segformer, work, monkeypatch) -> None:
    pytest.importorskip("streamlit")
    pytest.importorskip("streamlit_webrtc")
    from streamlit.testing.v1 import AppTest

    from dilseg.demo.loading import load_segmenter
    from dilseg.demo.settings import ENV_MODEL

    def errors(at) -> str:
        return "\n".join(e.value for e in [*at.error, *at.sidebar.error])

    monkeypatch.setenv(ENV_MODEL, str(adopted))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "demo" / "app.py"), default_timeout=60)
    at.session_state["source"] = "image"
    at.run()
    assert not at.exception and not errors(at)
    assert any("segformer" in c.value for c in at.sidebar.caption)
    street = list_images(CAMVID / "val" / "images")[0]
    at.file_uploader(key="image_upload").upload(street.name, street.read_bytes(), "image/jpeg").run()
    assert not at.exception and not errors(at)
    assert any(b.label == "Label PNG (class ids)" for b in at.get("download_button"))
    with load_segmenter(adopted, "ort-cpu") as seg:
        assert seg.process(cv2.imread(str(street))).labels.shape == (360, 480)

    # Uploads: a foreign ONNX gets the import command; the adopted one runs.
    plain = fm.user_export(fm.Logits(segformer), work / "plain.onnx", SIZE, dynamo=False)  # weights inside the file
    at.sidebar.radio(key="model_kind").set_value("upload").run()
    at.sidebar.file_uploader(key="model_upload").upload("segformer.onnx", plain.read_bytes()).run()
    assert not at.exception and "dilseg import" in errors(at) and "--classes camvid" in errors(at)
    at.sidebar.file_uploader(key="model_upload").set_value(("segformer_dilseg.onnx", adopted.read_bytes(),
                                                            "application/octet-stream")).run()
    assert not at.exception and not errors(at) and any("segformer" in c.value for c in at.sidebar.caption)


def test_adopted_graph_that_disagrees_with_the_original_is_refused_with_the_figure(work, capsys) -> None:
    """A graph whose scores carry fresh random noise on every run: the adopted copy cannot
    agree with the original, and the refusal gives the agreement measured."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 0.1, (11, 3, 4, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["pixel_values", "w"], ["scores"], strides=[4, 4]),
             helper.make_node("RandomNormalLike", ["scores"], ["noise"], scale=10.0),
             helper.make_node("Add", ["scores", "noise"], ["logits"])]
    graph = helper.make_graph(nodes, "noisy", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                                                             [1, 3, *SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 11, 16, 24])],
                              initializer=[weight])
    src = work / "noisy.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    out = work / "noisy_dilseg.onnx"
    rc, _, stderr = run_cli(capsys, "import", src, "-o", out, "--classes", "camvid", "--frames", CAMVID)
    assert rc == 2 and "agree with the original's argmax on only" in stderr and "(< 99.9%)" in stderr
    assert "nothing was written" in stderr and not out.exists()


def test_bench_runs_an_imported_model(adopted, capsys) -> None:
    rc, stdout, stderr = run_cli(capsys, "bench", "--model", adopted, "--frames", 5, "--warmup", 1, "--quiet")
    assert rc == 0, stderr
    assert "infer" in stdout


def test_import_needs_no_torch(segformer_onnx, work) -> None:
    import subprocess
    import sys

    out = work / "no_torch.onnx"
    code = ("import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
            "from dilseg.runtime.cli import main\n"
            f"sys.exit(main(['import', {str(segformer_onnx)!r}, '-o', {str(out)!r}, '--classes', 'camvid']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert read_onnx_meta(out).model == "segformer"


def test_opset_11_graph_gets_an_opset_11_head(work, capsys) -> None:
    """Before opset 13 Squeeze/Unsqueeze take axes as an attribute and Resize needs roi/scales inputs."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 11, 4, stride=4), torch.nn.ReLU()).eval()

    class Labels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x).argmax(1, keepdim=True)  # N x 1 x h x w int64 at 1/4

    for name, module in (("scores11", net), ("labels11", Labels().eval())):
        src = fm.user_export(module, work / f"{name}.onnx", SIZE, dynamo=False, opset=11)
        out = work / f"{name}_dilseg.onnx"
        rc, _, stderr = run_cli(capsys, "import", src, "-o", out, "--classes", "camvid", "--frames", CAMVID)
        assert rc == 0, stderr
        graph = onnx.load(str(out))
        assert graph.opset_import[0].version == 11 and graph.graph.output[0].type.tensor_type.elem_type == 6
        x = preprocess(camvid_frames(1)[0], read_onnx_meta(out))
        with torch.no_grad():
            small = net(torch.from_numpy(x)).numpy()
        got = open_backend(out).infer(x)[0]
        if name == "labels11":
            assert np.array_equal(got, np.repeat(np.repeat(small[0].argmax(0), 4, 0), 4, 1))
        else:
            assert got.shape == SIZE and len(np.unique(got)) > 1
