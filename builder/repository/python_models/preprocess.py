"""Triton model `preprocess`: prompt text, images and audio files to token ids and encoder inputs."""

from builder.runtime.audio import AudioLimits
from builder.runtime.errors import RequestError
from builder.runtime.image import ImageLimits
from builder.runtime.model_facts import ModelFacts
from builder.runtime.preprocess import Preprocessor, RequestLimits
from builder.runtime.text import load_tokenizer
from builder.runtime.triton_io import ModelArgs, input_array, input_bytes_list, respond_each


class TritonPythonModel:
    def initialize(self, args):
        self.args = ModelArgs(args)
        a = self.args
        limits = RequestLimits(
            max_images=a.int("max_images"),
            image=ImageLimits(max_bytes=a.int("max_image_bytes"), max_pixels=a.int("max_image_pixels")),
            audio=AudioLimits(max_bytes=a.int("max_audio_bytes"), max_clips=a.int("max_audio_clips")),
            max_prompt_tokens=a.int("max_prompt_tokens"),
            vision_enabled=a.bool("vision_enabled"),
            audio_enabled=a.bool("audio_enabled"),
        )
        facts = ModelFacts.load(a.file("model_facts.json"))
        self.preprocess = Preprocessor(facts, load_tokenizer(a.file("tokenizer.json")), limits)

    def handle(self, request):
        text = input_array(request, "text_input")
        if text is not None and text.size != 1:
            raise RequestError(f"text_input: expected one prompt, got {text.size}")
        inputs = self.preprocess(
            None if text is None else text.reshape(-1)[0],
            input_bytes_list(request, "image"),
            input_bytes_list(request, "audio"),
        )
        return {"input_ids": inputs.input_ids, "pixel_values": inputs.pixel_values, "input_features": inputs.input_features}

    def execute(self, requests):
        return respond_each(requests, self.args.name, self.handle)
