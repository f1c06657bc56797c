"""Torch-free runtime: source -> preprocess -> backend -> postprocess -> sink."""
