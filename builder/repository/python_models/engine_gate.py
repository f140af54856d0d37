"""Triton models `vision_encoder` / `audio_encoder` on targets onnxruntime and tensorrt.

Forwards a request's images (one call per image size) or clips to the encoder model that Triton's
own backend runs (`<encoder>_onnxruntime` / `<encoder>_tensorrt`, batched across requests there)
and answers requests without any itself: an engine has no batch of 0 (its profiles start at 1).
Runs only in the NGC container (the CPU-only tritonserver here has no ORT/TensorRT backend).
"""

import triton_python_backend_utils as pb_utils

from mmtb_runtime.encoders import encode_requests
from mmtb_runtime.model_facts import ModelFacts
from mmtb_runtime.triton_io import ModelArgs, input_array, respond_together


class TritonPythonModel:
    def initialize(self, args):
        self.args = ModelArgs(args)
        self.inputs = [t["name"] for t in self.args.config["input"]]
        self.graph_inputs = self.args.parameters["graph_inputs"].split(",")
        self.output = self.args.parameters["output"]
        self.engine = self.args.parameters["engine_model"]
        self.facts = ModelFacts.load(self.args.file("model_facts.json"))

    def run(self, feeds):
        response = pb_utils.InferenceRequest(
            model_name=self.engine, requested_output_names=[self.output],
            inputs=[pb_utils.Tensor(name, feeds[name]) for name in self.graph_inputs],
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        ).exec()
        if response.has_error():
            raise RuntimeError(f"{self.engine}: {response.error().message()}")
        # Copied: the view points into the response's shared memory, released when it goes.
        return pb_utils.get_output_tensor_by_name(response, self.output).as_numpy().copy()

    def handle(self, requests):
        # Each request's tensors are [1, items, ...] (one request: this model does not batch).
        media = [{name: input_array(r, name)[0] for name in self.inputs} for r in requests]
        return [{self.output: embeds[None]} for embeds in encode_requests(self.run, media, self.facts)]

    def execute(self, requests):
        return respond_together(requests, self.args.name, self.handle)
