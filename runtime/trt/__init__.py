"""Everything TensorRT and CUDA, torch-free: version gates (compat), the builder (build), the
engine cache and sidecars (cache), engine loaders (loaders), the GPU, its primary context and
CUDA graphs (cuda), the on-demand imports of tensorrt/pycuda (deps), the pre/post-processing
kernels (kernels) and the runner (runner), shaped like Polygraphy's TensorRT backend:
``TensorRTBackend(EngineFromOnnx("model.onnx"))`` or ``TensorRTBackend(EngineFromFile("m.engine"))``.

Importing any of these modules imports neither tensorrt nor pycuda: they are imported when an
engine is built or loaded, with an error that says how to install them.
"""
