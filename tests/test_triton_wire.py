"""runtime/backends/triton_wire.py: the hand-framed ModelInfer request is the message protobuf
would write, and a failed call is tritonclient's own error. (Served end to end against a real
tritonserver in tests/test_triton.py.)"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")

from tritonclient.grpc import InferenceServerException, service_pb2  # noqa: E402
from servers import free_port  # noqa: E402

from dilseg.runtime.backends.triton_backend import _classify  # noqa: E402
from dilseg.runtime.backends.triton_wire import RawInfer, _varint  # noqa: E402


@pytest.fixture
def raw():
    wire = RawInfer(f"127.0.0.1:{free_port()}")
    yield wire
    wire.close()


def test_the_length_prefix_is_protobufs():
    for size in (0, 1, 127, 128, 300, 16384, 518400):
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        msg = service_pb2.ModelInferRequest(raw_input_contents=[payload])  # field 7, length-delimited
        assert msg.SerializeToString() == b"\x3a" + _varint(size) + payload


@pytest.mark.parametrize("data", [np.arange(2 * 36 * 48 * 3, dtype=np.uint8).reshape(2, 36, 48, 3),
                                  np.linspace(-2, 2, 3 * 8 * 8, dtype=np.float32).reshape(1, 3, 8, 8),
                                  np.zeros((1, 480, 360, 3), np.uint8).transpose(0, 2, 1, 3)])  # not contiguous
def test_a_framed_request_parses_as_the_message_with_the_tensors_bytes(raw, data):
    header = raw.header("edge_m", "2", "FRAME", "UINT8", data.shape, "labels")
    request = service_pb2.ModelInferRequest.FromString(raw.frame(header, data))
    assert request.model_name == "edge_m" and request.model_version == "2"
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [("FRAME", "UINT8", list(data.shape))]
    assert [o.name for o in request.outputs] == ["labels"] and not request.outputs[0].parameters
    assert list(request.raw_input_contents) == [np.ascontiguousarray(data).tobytes()]
    assert raw.header("edge_m", "2", "FRAME", "UINT8", data.shape, "labels") is header  # made once per shape


def test_shared_memory_requests_name_the_regions_and_carry_no_bytes(raw):
    header = raw.header("edge_m", "", "FRAME", "UINT8", (1, 360, 480, 3), "labels", ("in_region", 518400),
                        ("out_region", 172800))
    request = service_pb2.ModelInferRequest.FromString(raw.frame(header, None))
    assert not request.raw_input_contents
    for tensor, name, size in ((request.inputs[0], "in_region", 518400), (request.outputs[0], "out_region", 172800)):
        assert tensor.parameters["shared_memory_region"].string_param == name
        assert tensor.parameters["shared_memory_byte_size"].int64_param == size
    other = raw.header("edge_m", "", "FRAME", "UINT8", (1, 360, 480, 3), "labels", ("in_region", 1036800),
                       ("out_region", 172800))
    assert other != header  # a grown region is a different request


def test_no_server_is_tritonclients_unavailable_error(raw):
    data = np.zeros((1, 8, 8, 3), np.uint8)
    with pytest.raises(InferenceServerException) as caught:
        raw.infer(raw.header("m", "", "FRAME", "UINT8", data.shape, "labels"), data, timeout=5)
    assert "UNAVAILABLE" in str(caught.value.status())
    assert _classify(caught.value) == "gone"  # so the backend waits for the server to come back
