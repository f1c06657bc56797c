"""dilseg: dilated-convolution semantic segmentation, PyTorch -> ONNX -> TensorRT, real-time video."""

__version__ = "0.1.0"
