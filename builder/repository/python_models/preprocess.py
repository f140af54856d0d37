"""Triton model `preprocess`: chat template, prompt text, images and audio files to token ids and encoder inputs."""

import numpy as np
from mmtb_runtime.contract import (
    AUDIO_FRAMES,
    AUDIO_INPUT,
    IMAGE_INPUT,
    IMAGE_SIZES,
    INPUT_FEATURES,
    INPUT_IDS,
    MESSAGES_INPUT,
    PIXEL_VALUES,
    PROMPT_POSITIONS,
    PROMPT_TOKENS_OUTPUT,
    SYSTEM_PROMPT_INPUT,
    TEXT_INPUT,
)
from mmtb_runtime.errors import RequestError
from mmtb_runtime.preprocess import Preprocessor, RequestLimits
from mmtb_runtime.triton_io import ModelArgs, input_array, input_bytes_list, respond_each


class TritonPythonModel:
    def initialize(self, args):
        self.args = ModelArgs(args)
        self.preprocess = Preprocessor.from_directory(self.args.directory, RequestLimits.from_parameters(self.args.parameters))

    def handle(self, request):
        text, system, messages = (self.single(request, t.name) for t in (TEXT_INPUT, SYSTEM_PROMPT_INPUT, MESSAGES_INPUT))
        inputs = self.preprocess(text, input_bytes_list(request, IMAGE_INPUT.name), input_bytes_list(request, AUDIO_INPUT.name),
                                 system, messages)
        # The encoders' inputs carry a leading axis of 1, the request (see the encoders' configs).
        outputs = {INPUT_IDS: inputs.input_ids, PIXEL_VALUES: inputs.pixel_values[None],
                   IMAGE_SIZES: inputs.image_sizes[None], INPUT_FEATURES: inputs.input_features[None],
                   AUDIO_FRAMES: inputs.audio_frames[None], PROMPT_POSITIONS: inputs.position_ids,
                   PROMPT_TOKENS_OUTPUT.name: np.array([inputs.input_ids.size], dtype=PROMPT_TOKENS_OUTPUT.numpy_dtype)}
        # Only what this model's config declares: a build without an encoder has no output for it.
        return {name: outputs[name] for name in request.requested_output_names()}

    def single(self, request, name):
        value = input_array(request, name)
        if value is not None and value.size != 1:
            raise RequestError(f"{name}: expected one string, got {value.size}")
        return None if value is None else value.reshape(-1)[0]

    def execute(self, requests):
        return respond_each(requests, self.args.name, self.handle)
