"""Gemma 3 (gemma-3-4b/12b/27b-it): SigLIP vision tower + pooling projector + Gemma 3 decoder, text and images in.

As Google publishes it: ``config.json`` (``Gemma3Config``), safetensors shards (``lm_head`` tied to the
embeddings), ``tokenizer.json`` with its ``tokenizer_config.json`` (``boi_token``, ``image_token``, ``eoi_token``),
the chat template, ``preprocessor_config.json`` and ``processor_config.json`` (``image_seq_length``). Every image
is squashed to one square (bilinear), and each ``<start_of_image>`` the template writes becomes, in the text before
tokenizing, ``"\\n\\n<start_of_image>" + <image_soft_token> x mm_tokens_per_image + "<end_of_image>\\n\\n"``. In a
prefill the soft tokens of one image attend to each other both ways; sliding-window layers see a window back
(:class:`builder.families.gemma3.export.BidirectionalImageLanguageModel`). Pan-and-scan crops are not supported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from builder.errors import BuildError
from builder.families.base import Family, SourceModel, greedy_new_tokens, model_facts
from builder.families.hf_files import added_tokens, load_pretrained, read_json, token_id
from builder.runtime.model_facts import ImageFacts, ModelFacts
from builder.runtime.preprocess import ModelInputs

_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's filter numbers, as preprocessor_config.json stores them

# Gemma 3's published chat template (google/gemma-3-4b-it), for checkpoints without one of their own.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)


def _image_facts(directory: Path, tokenizer: Path, config: Any) -> ImageFacts:
    pre, processor = read_json(directory / "preprocessor_config.json"), read_json(directory / "processor_config.json")
    pre = {**processor.get("image_processor", {}), **pre}  # transformers 5 may nest it in processor_config.json
    names = {**{"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"},
             **{k: v for k, v in read_json(directory / "tokenizer_config.json").items()
                if k in ("boi_token", "image_token", "eoi_token") and isinstance(v, str)}}
    added = added_tokens(tokenizer)
    soft = token_id(added, names["image_token"], tokenizer)
    for name, configured in (("boi_token", config.boi_token_index), ("image_token", config.image_token_index)):
        if token_id(added, names[name], tokenizer) != configured:
            raise BuildError(f"{directory}: {names[name]} is token {token_id(added, names[name], tokenizer)} in "
                             f"{tokenizer} but {configured} in config.json")
    side = int(config.vision_config.image_size)
    size = pre.get("size") or {}
    if size and (int(size.get("height", side)), int(size.get("width", side))) != (side, side):
        raise BuildError(f"{directory / 'preprocessor_config.json'}: size {size} is not the vision tower's {side}x{side}")
    tokens = int(config.mm_tokens_per_image)
    if int(processor.get("image_seq_length", pre.get("image_seq_length", tokens))) != tokens:
        raise BuildError(f"{directory}: the processor's image_seq_length differs from mm_tokens_per_image={tokens}")
    if pre.get("do_pan_and_scan"):
        raise BuildError(f"{directory / 'preprocessor_config.json'}: do_pan_and_scan is not supported; set it to false")
    resample = int(pre.get("resample", 2))
    if resample not in _RESAMPLE:
        raise BuildError(f"{directory / 'preprocessor_config.json'}: resample={resample} is not bilinear (2) or bicubic (3)")
    patch = int(config.vision_config.patch_size)
    return ImageFacts(
        token=soft, row_break=-1, end=-1,
        # One placeholder cell is the whole image: patch x (patches per side).
        patch_size=patch, merge_size=side // patch, longest_edge=side,
        mean=tuple(pre.get("image_mean", (0.5, 0.5, 0.5))), std=tuple(pre.get("image_std", (0.5, 0.5, 0.5))),
        token_text=names["boi_token"], layout="fixed", resample=_RESAMPLE[resample], tokens_per_image=tokens,
        expansion=f"\n\n{names['boi_token']}{names['image_token'] * tokens}{names['eoi_token']}\n\n",
    )


class Gemma3(Family):
    MODEL_TYPE = "gemma3"
    DEFAULT_CHAT_TEMPLATE = DEFAULT_CHAT_TEMPLATE

    def read_facts(self, directory: Path, tokenizer: Path) -> ModelFacts:
        from transformers import Gemma3Config

        config = Gemma3Config.from_pretrained(directory)
        return model_facts(self.MODEL_TYPE, directory, config, _image_facts(directory, tokenizer, config), None)

    def load(self, directory: Path, dtype: str, tokenizer: Path, layers_on_demand: bool = False) -> SourceModel:
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration

        config = Gemma3Config.from_pretrained(directory)
        model = load_pretrained(Gemma3ForConditionalGeneration, directory, config, dtype, layers_on_demand=layers_on_demand)
        return SourceModel(directory, model, self.read_facts(directory, tokenizer))

    def reference_generate(self, source: SourceModel, inputs: ModelInputs, max_new_tokens: int) -> list[int]:
        image = source.facts.image
        assert image is not None
        # token_type_ids: what the processor gives generate, so the prefill attends both ways inside an image.
        media = {"pixel_values": inputs.pixel_values} if len(inputs.pixel_values) else {}
        return greedy_new_tokens(source, inputs.input_ids, max_new_tokens,
                                 token_type_ids=(inputs.input_ids == image.token).astype(np.int64)[None], **media)


FAMILY = Gemma3()
