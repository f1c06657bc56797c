"""Triton Python-backend model written by `dilseg export triton --platform python` (as model.py).

It serves a dilseg ONNX (``model.onnx`` in the version folder) with dilseg's own preprocessing
and ONNX Runtime, for CPU servers and for clients that send plain frames: each request carries
BGR uint8 frames (N x H x W x 3, any size), each frame is resized and normalised exactly as
dilseg does in-process (``dilseg.runtime.preprocess``), the frames of every request the
dynamic batcher gathered run as one ONNX Runtime call, and labels at the model's resolution go
back (uint8 where the classes fit, else int32, as config.pbtxt says) (a logits model is reduced to labels here, so only labels cross the
network). The server's Python needs dilseg's runtime: ``pip install dilseg`` (no torch).

A bad request (wrong dtype or shape) gets its own error response; it never fails the others
in its batch nor the server.
"""

import json
from pathlib import Path

import cv2
import numpy as np
import triton_python_backend_utils as pb_utils
from dilseg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from dilseg.runtime.errors import DilsegError, first_line
from dilseg.runtime.preprocess import input_size_for, normalize

INPUT = "FRAME"
OUTPUT = "labels"


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        # dilseg's own ONNX Runtime backend: the best provider installed (CUDA where onnxruntime-gpu is).
        try:
            self.backend = OnnxRuntimeBackend(path, threads=int(params.get("intra_op_threads") or 0) or None).load()
        except DilsegError as exc:
            raise pb_utils.TritonModelException(str(exc)) from None
        self.meta = self.backend.meta
        # A batch axis the graph fixes at 1 runs frame by frame (the config then has max_batch_size 0).
        self.batched = self.backend.batch_range()[1] != 1
        served = [o["name"] for o in config.get("output", [])]
        if served != [OUTPUT]:
            raise pb_utils.TritonModelException(f"config.pbtxt must declare one output {OUTPUT!r}, not {served}")
        self.label_dtype = np.uint8 if config["output"][0]["data_type"] == "TYPE_UINT8" else np.int32

    def _frames(self, request) -> np.ndarray:
        tensor = pb_utils.get_input_tensor_by_name(request, INPUT)
        if tensor is None:
            raise ValueError(f"the request has no {INPUT!r} input")
        frames = tensor.as_numpy()  # N x H x W x 3: Triton's batch axis, or the config's batch of one
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"{INPUT} must be BGR uint8 frames (N x H x W x 3), got {frames.dtype} "
                             f"{'x'.join(map(str, frames.shape))}")
        return frames

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self.batched:
            out = self.backend.infer(batch)
        else:
            out = np.concatenate([self.backend.infer(t[None]) for t in batch])
        if self.meta.output_kind == "logits":
            out = out.argmax(axis=1)
        return out.astype(self.label_dtype, copy=False)

    def finalize(self) -> None:
        self.backend.close()

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        groups: dict[tuple, list] = {}  # model input (h, w) -> [(request index, its frames)]
        for i, request in enumerate(requests):
            try:
                frames = self._frames(request)
            except ValueError as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
                continue
            groups.setdefault(input_size_for(frames.shape[1:], self.meta), []).append((i, frames))
        for (h, w), group in groups.items():
            # Every frame is normalised straight into its place in the one input tensor of the
            # group (as preprocess does, into a tensor of its own in-process): no copies between.
            batch = np.empty((sum(len(f) for _, f in group), 3, h, w), np.float32)
            k = 0
            for _, frames in group:
                for frame in frames:
                    if frame.shape[:2] != (h, w):
                        frame = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)
                    normalize(frame, self.meta, out=batch[k:k + 1])
                    k += 1
            try:
                labels = self._run(batch)
            except Exception as exc:  # ONNX Runtime's own error types: the requests fail, the server stays
                message = first_line(exc) or type(exc).__name__
                for i, _ in group:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"inference failed: {message}"))
                continue
            start = 0
            for i, frames in group:
                part = labels[start:start + len(frames)]
                start += len(frames)
                responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT, part)])
        return responses
