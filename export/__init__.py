"""Torch side of dilseg: model zoo, training, ONNX export and TensorRT engine builds."""
