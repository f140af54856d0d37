"""Triton models `vision_encoder` / `audio_encoder`: run the encoder graph on a request's images or clips."""

import os

import numpy as np
import onnxruntime as ort

from builder.runtime.triton_io import ModelArgs, input_array, respond_each


class TritonPythonModel:
    def initialize(self, args):
        self.args = ModelArgs(args)
        self.input, self.output = self.args.parameters["input"], self.args.parameters["output"]
        self.empty_shape = (0, self.args.int("tokens"), self.args.int("hidden_size"))
        path = self.args.file("model.onnx")
        # A model built without this modality has no graph and only ever sees empty inputs.
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"]) if os.path.exists(path) else None

    def handle(self, request):
        batch = input_array(request, self.input)
        if batch is None or batch.shape[0] == 0 or self.session is None:
            return {self.output: np.zeros(self.empty_shape, dtype=np.float32)}
        return {self.output: self.session.run([self.output], {self.input: batch})[0]}

    def execute(self, requests):
        return respond_each(requests, self.args.name, self.handle)
