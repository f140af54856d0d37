"""Triton model `fuse`: image/audio embeddings placed at their placeholder tokens."""

import numpy as np
from mmtb_runtime.contract import AUDIO_EMBEDS, IMAGE_EMBEDS, INPUT_IDS, MULTIMODAL_EMBEDS, MULTIMODAL_MASK
from mmtb_runtime.model_facts import ModelFacts
from mmtb_runtime.preprocess import fuse_embeddings
from mmtb_runtime.triton_io import ModelArgs, input_array, respond_each


class TritonPythonModel:
    def initialize(self, args):
        self.args = ModelArgs(args)
        self.facts = ModelFacts.load(self.args.file("model_facts.json"))
        self.none = np.zeros((0, self.facts.hidden_size), np.float32)  # a build without that encoder

    def handle(self, request):
        embeds, mask = fuse_embeddings(
            input_array(request, INPUT_IDS), self.embeds(request, IMAGE_EMBEDS), self.embeds(request, AUDIO_EMBEDS),
            self.facts,
        )
        return {MULTIMODAL_EMBEDS: embeds, MULTIMODAL_MASK: mask}

    def embeds(self, request, name):
        value = input_array(request, name)  # [1, tokens, hidden]: one request's embeddings
        return self.none if value is None else value[0]

    def execute(self, requests):
        return respond_each(requests, self.args.name, self.handle)
