"""ONNX Runtime sessions compute int8 products exactly on every x86 CPU (runtime/ort_options.py).

On a CPU without VNNI (AVX2 only, or AVX-512 without VNNI) ONNX Runtime's default uint8 x
int8 kernel saturates its 16-bit intermediates; the graph below is built so that it does.
On a VNNI CPU the default kernel is exact too, so there these tests hold either way; on the
CPUs they protect, dropping the session option makes them fail."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dilseg.runtime.backends import open_backend
from dilseg.runtime.ort_options import EXACT_INT8, UNFUSED_NOTE, open_session

K = 64  # products per output: 64 x 255 x 127 overflows int16 pairs many times over


def saturating_int8_graph(weight: int = 127) -> bytes:
    """x (uint8 after quantisation, all 255) times int8 weights of +-``weight`` (127: +127/-128,
    whose pair sums overflow int16; 64 or less: 7-bit weights, which cannot), as QDQ nodes
    that ONNX Runtime fuses into one integer MatMul."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    low = -128 if weight == 127 else -abs(weight)
    w = np.full((K, 4), abs(weight), np.int8)
    w[:, 1] = low
    w[1::2, 2] = low
    consts = {"w": w, "ws": np.array(0.01, np.float32), "wz": np.array(0, np.int8),
              "xs": np.array(1 / 255, np.float32), "xz": np.array(0, np.uint8),
              "ys": np.array(0.5, np.float32), "yz": np.array(128, np.uint8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["m"]),
             helper.make_node("QuantizeLinear", ["m", "ys", "yz"], ["mq"]),
             helper.make_node("DequantizeLinear", ["mq", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "saturating", [x], [y], [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def exact_result(x: np.ndarray, weight: int = 127) -> np.ndarray:
    """The graph's output from its definition: integer products, then requantisation."""
    model = saturating_int8_graph(weight)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # DQ -> float MatMul -> Q, unfused
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_int8_products_are_exact() -> None:
    x = np.ones((1, 3, 8, K), np.float32)
    want = exact_result(x)
    assert np.allclose(want[0, 0, 0], [63.5, -64.0, -0.5, 63.5])  # clipped by the output's int8 range
    got = open_session(saturating_int8_graph()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)


def test_the_onnxruntime_backend_asks_for_exact_int8(small_onnx) -> None:
    backend = open_backend(small_onnx, providers=["cpu"])
    options = backend.session.get_session_options()
    assert options.get_session_config_entry(EXACT_INT8[0]) == EXACT_INT8[1]
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_a_graph_the_exact_rewrite_cannot_take_runs_unfused_and_says_so(monkeypatch) -> None:
    # ONNX Runtime's exact-int8 rewrite refuses some graphs (seen on transformer imports) on
    # CPUs without VNNI only; the refusal is reproduced here so every CPU tests the way out.
    real = ort.InferenceSession
    levels = []

    def refusing(model, so, **kwargs):
        levels.append(so.graph_optimization_level)
        if so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Exception during initialization: graph_utils.cc:479 "
                               "AddInitializerWithOrtValue [ONNXRuntimeError] : 1 : FAIL : graph.cc:4164 "
                               "AddInitializedOrtValue Attempt to replace the existing tensor")
        return real(model, so, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", refusing)
    notes = []
    session = open_session(saturating_int8_graph(), log=notes.append)
    assert levels == [ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC]
    assert notes == [f"{UNFUSED_NOTE} (graph.cc:4164 AddInitializedOrtValue Attempt to replace the existing tensor)"]
    x = np.ones((1, 3, 8, K), np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], exact_result(x))


def test_a_graph_onnxruntime_cannot_load_still_fails_with_its_own_error(tmp_path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    notes = []
    with pytest.raises(Exception, match="(?i)protobuf|load"):
        open_session(str(bad), log=notes.append)
    assert notes == []
