"""Triton model `fuse`: image/audio embeddings placed at their placeholder tokens."""

from builder.runtime.model_facts import ModelFacts
from builder.runtime.preprocess import fuse_embeddings
from builder.runtime.triton_io import ModelArgs, input_array, respond_each


class TritonPythonModel:
    def initialize(self, args):
        self.args = ModelArgs(args)
        self.facts = ModelFacts.load(self.args.file("model_facts.json"))

    def handle(self, request):
        embeds, mask = fuse_embeddings(
            input_array(request, "input_ids"), input_array(request, "image_embeds"),
            input_array(request, "audio_embeds"), self.facts,
        )
        return {"multimodal_embeds": embeds, "multimodal_mask": mask}

    def execute(self, requests):
        return respond_each(requests, self.args.name, self.handle)
