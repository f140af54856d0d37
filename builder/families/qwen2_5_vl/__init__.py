"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``: Qwen2.5-VL-3B/7B/32B/72B-Instruct): the windowed Qwen2.5-VL
vision tower + merger and a Qwen2 decoder with M-RoPE; text and images in.

As Qwen publishes it: ``config.json`` (``Qwen2_5_VLConfig``), safetensors shards, ``tokenizer.json``, the chat
template (``chat_template.json``: a default system prompt, each image ``<|vision_start|><|image_pad|><|vision_end|>``)
and ``preprocessor_config.json`` (``Qwen2VLImageProcessor``: min/max_pixels, mean/std). The vision tower, its image
layout ("qwen_vl": ``smart_resize``d within min/max_pixels, one ``<|image_pad|>`` per 28 x 28 pixels) and the
decoder's M-RoPE positions are Qwen2.5-Omni's, whose functions this family reuses. Videos are not supported.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from builder.families.base import Family, SourceModel, greedy_new_tokens, model_facts
from builder.families.hf_files import load_pretrained, read_json
from builder.families.qwen25_omni import qwen_vl_image_facts, qwen_vl_image_inputs
from builder.runtime.model_facts import ModelFacts
from builder.runtime.preprocess import ModelInputs

IMAGE_TOKEN = "<|image_pad|>"

# Qwen2.5-VL-7B-Instruct's chat_template.json, for checkpoints without one of their own.
DEFAULT_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _config(directory: Path) -> Any:
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig.from_pretrained(directory)


class Qwen25VL(Family):
    MODEL_TYPE = "qwen2_5_vl"
    DEFAULT_CHAT_TEMPLATE = DEFAULT_CHAT_TEMPLATE

    def read_facts(self, directory: Path, tokenizer: Path) -> ModelFacts:
        config = _config(directory)
        image = qwen_vl_image_facts(directory, tokenizer, config.vision_config, read_json(directory / "preprocessor_config.json"),
                                    IMAGE_TOKEN, config.image_token_id)
        return dataclasses.replace(model_facts(self.MODEL_TYPE, directory, config, image, None), position_rows=3)

    def load(self, directory: Path, dtype: str, tokenizer: Path, layers_on_demand: bool = False) -> SourceModel:
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = load_pretrained(Qwen2_5_VLForConditionalGeneration, directory, _config(directory), dtype, layers_on_demand=layers_on_demand)
        return SourceModel(directory, model, self.read_facts(directory, tokenizer))

    def reference_generate(self, source: SourceModel, inputs: ModelInputs, max_new_tokens: int) -> list[int]:
        return greedy_new_tokens(source, inputs.input_ids, max_new_tokens, **qwen_vl_image_inputs(source.facts.image, inputs))


FAMILY = Qwen25VL()
