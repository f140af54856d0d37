"""Triton models `vision_encoder` / `audio_encoder` (target python): the encoder graph, run by ONNX
Runtime on the images or clips of every request Triton batched together (one run per image size)."""

from mmtb_runtime.encoders import encode_requests, encoder_session, session_run
from mmtb_runtime.model_facts import ModelFacts
from mmtb_runtime.triton_io import ModelArgs, input_array, respond_together


class TritonPythonModel:
    def initialize(self, args):
        self.args = ModelArgs(args)
        self.inputs = [t["name"] for t in self.args.config["input"]]
        self.output = self.args.parameters["output"]
        self.facts = ModelFacts.load(self.args.file("model_facts.json"))
        self.run = session_run(encoder_session(self.args.file("model.onnx")), self.output)

    def handle(self, requests):
        # Each request's tensors are [1, items, ...]: the 1 is the request, Triton's batch axis here.
        media = [{name: input_array(r, name)[0] for name in self.inputs} for r in requests]
        return [{self.output: embeds[None]} for embeds in encode_requests(self.run, media, self.facts)]

    def execute(self, requests):
        return respond_together(requests, self.args.name, self.handle)
