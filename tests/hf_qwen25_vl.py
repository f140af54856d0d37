"""A tiny Qwen2.5-VL checkpoint written by transformers, and HF's own pipeline on it (the reference).

As Qwen publishes Qwen2.5-VL-3B/7B/72B-Instruct (``model_type: qwen2_5_vl``): ``config.json``
(``Qwen2_5_VLConfig``), BF16 safetensors shards, a Qwen2 byte-level BPE ``tokenizer.json`` whose added tokens follow
Qwen2.5-VL's order, the published ``chat_template.json`` (a default system prompt, each image
``<|vision_start|><|image_pad|><|vision_end|>``) and ``preprocessor_config.json``. Odd sizes (text hidden 60,
3 layers, mrope_section [2, 4, 4]; vision depth 4 with full-attention blocks [1, 3]) with the real patch 14 / merge 2
/ window 112. The reference is ``Qwen2_5_VLProcessor`` (its template, ``Qwen2VLImageProcessorPil``) + ``generate``;
its video processor needs torchvision (not installed), so the processor is built with ``video_processor=None``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (AutoTokenizer, GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil)

from tests.hf_checkpoints import template_then_processor_generate
from tests.hf_qwen25_omni import WithoutVideo, _reinit, build_tokenizer

# Qwen2.5-VL's added tokens in their id order (151643 ... 151656 in the real tokenizer).
SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
MODEL_SPECIFIC_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                         "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}
VOCAB_PADDING = 11  # embedding rows past the tokenizer, never produced by it

# Qwen/Qwen2.5-VL-7B-Instruct chat_template.json, as published.
CHAT_TEMPLATE = (
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

# Qwen/Qwen2.5-VL-7B-Instruct preprocessor_config.json, as published.
PREPROCESSOR_CONFIG = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}


def qwen25_vl_config(tokenizer) -> Qwen2_5_VLConfig:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer) + VOCAB_PADDING, "hidden_size": 60, "intermediate_size": 112,
            "num_hidden_layers": 3, "num_attention_heads": 3, "num_key_value_heads": 1,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 4, 4]},
            "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 28,
            "bos_token_id": ids["<|im_start|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 4, "hidden_size": 40, "intermediate_size": 68, "num_heads": 2, "in_chans": 3, "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 60,
            "fullatt_block_indexes": [1, 3], "hidden_act": "silu",
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def write_qwen25_vl_checkpoint(directory: Path, seed: int = 0) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(specials=SPECIALS, model_specific_tokens=MODEL_SPECIFIC_TOKENS)
    config = qwen25_vl_config(tokenizer)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _reinit(model.model.language_model, 0.1, generator)
    _reinit(model.model.visual, 0.1, generator)  # includes visual.merger (vision -> text projector)
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.normal_(0.0, 1.0, generator=generator)
        model.lm_head.weight.normal_(0.0, 0.2, generator=generator)
        # specials and padding rows never win: answers run to max_new_tokens
        model.lm_head.weight[tokenizer.convert_tokens_to_ids(SPECIALS[0]):] = 0.0
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="200KB")
    GenerationConfig(bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
                     eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id],
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    return directory


class NoVideoQwen2_5_VLProcessor(WithoutVideo, Qwen2_5_VLProcessor):
    @property
    def model_input_names(self):
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))


def load_processor(directory: Path) -> Qwen2_5_VLProcessor:
    directory = Path(directory)
    return NoVideoQwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(directory), video_processor=None,
        tokenizer=AutoTokenizer.from_pretrained(directory),
        chat_template=json.loads((directory / "chat_template.json").read_text())["chat_template"],
    )


def qwen25_vl_pipeline_generate(model, processor, text: str, images: list, max_new_tokens: int,
                                system_prompt: str | None = None) -> list[int]:
    """HF's own pipeline on one user turn (images, then the text) after an optional system turn: see
    :func:`tests.hf_checkpoints.template_then_processor_generate`."""
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
    system = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt is not None else []
    return template_then_processor_generate(model, processor, [*system, {"role": "user", "content": content}],
                                            max_new_tokens, images)
