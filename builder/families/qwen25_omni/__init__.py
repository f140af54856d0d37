"""Qwen2.5-Omni thinker (``Qwen2_5OmniThinkerForConditionalGeneration``): Qwen2.5-VL's windowed vision tower, a
Whisper-style audio tower attending inside 2 s chunks, and a Qwen2 decoder with M-RoPE; text, images and audio in.

As a thinker-only checkpoint is published (``model_type: qwen2_5_omni_thinker``, what ``save_pretrained`` of the
class writes): ``config.json`` (``Qwen2_5OmniThinkerConfig``), safetensors shards, ``tokenizer.json``, the chat
template (``chat_template.json``: a default system prompt, each image ``<|vision_bos|><|IMAGE|><|vision_eos|>``,
each audio ``<|audio_bos|><|AUDIO|><|audio_eos|>``) and one ``preprocessor_config.json`` holding the
Qwen2VLImageProcessor and WhisperFeatureExtractor keys. Images are ``smart_resize``d (bicubic) within
min/max_pixels, one ``<|IMAGE|>`` per 28 x 28 pixels; audio at 16 kHz up to 300 s (longer is refused: the processor
would cut it), one ``<|AUDIO|>`` per 40 ms. The decoder's positions are 3 rows (temporal, height, width) that
preprocessing computes (``runtime.prompt.mrope_positions``). Videos (and audio inside videos) are not supported.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from builder.errors import BuildError
from builder.families.base import Family, SourceModel, greedy_new_tokens, model_facts
from builder.families.hf_files import added_tokens, check_feature_extractor, load_pretrained, read_json, token_id
from builder.runtime.audio import HOP, SAMPLE_RATE
from builder.runtime.model_facts import AudioFacts, ImageFacts, ModelFacts
from builder.runtime.preprocess import ModelInputs

IMAGE_TOKEN, AUDIO_TOKEN = "<|IMAGE|>", "<|AUDIO|>"
_BICUBIC = 3  # PIL's filter number, as preprocessor_config.json stores it

# Qwen2.5-Omni-7B's chat_template.json, for checkpoints without one of their own.
DEFAULT_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: "
    "{% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _configured_token(directory: Path, tokenizer: Path, name: str, configured: int) -> int:
    token = token_id(added_tokens(tokenizer), name, tokenizer)
    if token != configured:
        raise BuildError(f"{directory}: {name} is token {token} in {tokenizer} but {configured} in config.json")
    return token


def qwen_vl_image_facts(directory: Path, tokenizer: Path, vision: Any, pre: dict[str, Any], token_text: str,
                        configured_token: int) -> ImageFacts:
    """Qwen2.5-VL's vision tower (``vision`` config) fed as its ``Qwen2VLImageProcessor`` (``pre``, the checkpoint's
    preprocessor_config.json) prepares images; ``token_text``: the placeholder, token ``configured_token`` in
    config.json. Shared by the families built on that tower."""
    if int(pre.get("resample", _BICUBIC)) != _BICUBIC:
        raise BuildError(f"{directory / 'preprocessor_config.json'}: resample={pre['resample']} is not bicubic (3)")
    size = pre.get("size") or {}
    for key, value in (("patch_size", vision.patch_size), ("merge_size", vision.spatial_merge_size),
                       ("temporal_patch_size", vision.temporal_patch_size)):
        if key in pre and int(pre[key]) != int(value):
            raise BuildError(f"{directory / 'preprocessor_config.json'}: {key} {pre[key]} is not the vision tower's {value}")
    return ImageFacts(
        token=_configured_token(directory, tokenizer, token_text, configured_token), row_break=-1, end=-1,
        patch_size=int(vision.patch_size), merge_size=int(vision.spatial_merge_size),
        longest_edge=0,  # no longest edge: min_pixels..max_pixels bound the area
        mean=tuple(pre.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
        std=tuple(pre.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
        token_text=token_text, layout="qwen_vl", resample="bicubic",
        min_pixels=int(pre.get("min_pixels", size.get("shortest_edge", 56 * 56))),
        max_pixels=int(pre.get("max_pixels", size.get("longest_edge", 28 * 28 * 16384))),
        temporal_patch_size=int(vision.temporal_patch_size), window_size=int(vision.window_size),
    )


def _audio_facts(directory: Path, tokenizer: Path, config: Any, pre: dict[str, Any]) -> AudioFacts:
    tower = config.audio_config
    audio = AudioFacts(
        token=_configured_token(directory, tokenizer, AUDIO_TOKEN, config.audio_token_index), begin=None,
        num_mel_bins=int(tower.num_mel_bins), clip_samples=int(pre.get("n_samples", 300 * SAMPLE_RATE)), hop_length=HOP,
        positions_per_token=2, layout="chunked", token_text=AUDIO_TOKEN, chunk_frames=2 * int(tower.n_window),
    )
    check_feature_extractor(directory, audio)
    return audio


def _config(directory: Path) -> Any:
    from transformers import Qwen2_5OmniThinkerConfig

    config = Qwen2_5OmniThinkerConfig.from_pretrained(directory)
    # get_rope_index reads these; the published thinker configs carry them, transformers does not declare them.
    for name in ("vision_start_token_id", "vision_end_token_id"):
        if getattr(config, name, None) is None:
            raise BuildError(f"{directory / 'config.json'}: {name} is missing (the model's own generate needs it)")
    return config


class Qwen25OmniThinker(Family):
    MODEL_TYPE = "qwen2_5_omni_thinker"
    DEFAULT_CHAT_TEMPLATE = DEFAULT_CHAT_TEMPLATE

    def read_facts(self, directory: Path, tokenizer: Path) -> ModelFacts:
        config = _config(directory)
        pre = read_json(directory / "preprocessor_config.json")
        image = qwen_vl_image_facts(directory, tokenizer, config.vision_config, pre, IMAGE_TOKEN, config.image_token_index)
        facts = model_facts(self.MODEL_TYPE, directory, config, image, _audio_facts(directory, tokenizer, config, pre))
        return dataclasses.replace(facts, position_rows=3)

    def load(self, directory: Path, dtype: str, tokenizer: Path, layers_on_demand: bool = False) -> SourceModel:
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration

        model = load_pretrained(Qwen2_5OmniThinkerForConditionalGeneration, directory, _config(directory), dtype, layers_on_demand=layers_on_demand)
        return SourceModel(directory, model, self.read_facts(directory, tokenizer))

    def reference_generate(self, source: SourceModel, inputs: ModelInputs, max_new_tokens: int) -> list[int]:
        from builder.runtime.audio import audio_feeds

        media = qwen_vl_image_inputs(source.facts.image, inputs)
        if len(inputs.input_features):
            media.update(audio_feeds(inputs.input_features, inputs.audio_frames))
        return greedy_new_tokens(source, inputs.input_ids, max_new_tokens, **media)


def qwen_vl_image_inputs(image: ImageFacts | None, inputs: ModelInputs) -> dict[str, np.ndarray]:
    """A request's images as the HF model takes them from its processor: flat patches and a (t, h, w) grid per image."""
    from builder.runtime.media import image_layout

    if not len(inputs.pixel_values):
        return {}
    assert image is not None
    crops = [inputs.pixel_values[i : i + 1, :, :h, :w] for i, (h, w) in enumerate(inputs.image_sizes)]
    return {"pixel_values": np.concatenate([image_layout(image).graph_feeds(c)["pixel_patches"] for c in crops]),
            "image_grid_thw": np.array([[1, h // image.patch_size, w // image.patch_size] for h, w in inputs.image_sizes],
                                       np.int64)}


FAMILY = Qwen25OmniThinker()
