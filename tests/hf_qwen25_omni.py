"""A tiny Qwen2.5-Omni thinker checkpoint written by transformers, and HF's own pipeline on it (the reference).

The checkpoint is a published thinker-only layout (``model_type: qwen2_5_omni_thinker``): odd sizes (text hidden 72,
3 layers, mrope_section [2, 5, 5]; vision depth 4 with full-attention blocks [1, 3]; audio 2 layers), the real
patch 14 / merge 2 / window 112 / n_window 100 / 128 mels, BF16 shards, a Qwen2 byte-level BPE tokenizer whose
specials follow Qwen's order, ``vocab_size`` past the tokenizer, the published chat template and
preprocessor_config.json. Weights are widened so answers depend on the image and the audio and are not one token.

The reference is ``Qwen2_5OmniProcessor`` (its template, Qwen2VLImageProcessorPil, WhisperFeatureExtractor) +
``generate``. ``Qwen2_5OmniProcessor.from_pretrained`` needs torchvision for its video processor (not installed), so
the processor is built from the checkpoint's files with ``video_processor=None``; images and audio run HF's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    WhisperFeatureExtractor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from tests.hf_checkpoints import template_then_processor_generate

# Qwen2.5-Omni's added tokens in their id order (151643 ... 151664 in the real tokenizer).
SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>",
]
NON_SPECIAL_ADDED = ["<tool_call>", "</tool_call>"]
FIM_SPECIALS = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
# The attributes Qwen2_5OmniProcessor reads from the tokenizer (tokenizer.image_token, ...image_token_id, ...)
MODEL_SPECIFIC_TOKENS = {
    "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
}
VOCAB_PADDING = 13  # embedding rows past the tokenizer, never produced by it (the 7B has 399)

# The published Qwen2.5-Omni chat template (Qwen/Qwen2.5-Omni-7B chat_template.json). Source used here:
# huggingface/transformers tests/models/qwen2_5_omni/test_processor_qwen2_5_omni.py::prepare_processor_dict,
# identical to the chat_template.jinja reported for fine-tunes of Qwen2.5-Omni-7B.
CHAT_TEMPLATE = (
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

# Qwen/Qwen2.5-Omni-7B preprocessor_config.json, values as published (one file for image + audio).
PREPROCESSOR_CONFIG = {
    "chunk_length": 300, "dither": 0.0, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128,
    "hop_length": 160, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Qwen2VLImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_pixels": 12845056, "merge_size": 2, "min_pixels": 3136, "n_fft": 400, "n_samples": 4800000,
    "nb_max_frames": 30000, "padding_side": "right", "padding_value": 0.0, "patch_size": 14,
    "processor_class": "Qwen2_5OmniProcessor", "return_attention_mask": True, "sampling_rate": 16000,
    "temporal_patch_size": 2,
}

CORPUS = [
    "What is in the picture? Describe the colours and the shapes you see.",
    "Listen to this audio clip and tell me what you hear, then compare it with the image.",
    "You are a helpful assistant. The quick brown fox jumps over the lazy dog near the river bank.",
    "Täglich grüßt das Murmeltier; ¿qué hora es? 東京は晴れです。 1234 3.14 user assistant system",
]


def build_tokenizer(vocab_size: int = 380, specials: list[str] = SPECIALS,
                    model_specific_tokens: dict[str, str] = MODEL_SPECIFIC_TOKENS) -> Qwen2Tokenizer:
    """Byte-level BPE trained with Qwen2's own normalizer / pre-tokenizer / decoder; ``specials`` (a Qwen model's
    added tokens in their id order) appended after, and ``model_specific_tokens`` as its processor reads them."""
    backend = Tokenizer(BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL_ADDED])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in FIM_SPECIALS])
    return Qwen2Tokenizer(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
        extra_special_tokens=dict(model_specific_tokens), errors="replace", model_max_length=32768,
        split_special_tokens=False, clean_up_tokenization_spaces=False,
    )


def thinker_config(tokenizer: Qwen2Tokenizer) -> Qwen2_5OmniThinkerConfig:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    user_id = tokenizer.convert_tokens_to_ids("user")
    return Qwen2_5OmniThinkerConfig(
        text_config={
            "vocab_size": len(tokenizer) + VOCAB_PADDING, "hidden_size": 72, "intermediate_size": 136,
            "num_hidden_layers": 3, "num_attention_heads": 3, "num_key_value_heads": 1,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 5, 5]},
            "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 28,
            "tie_word_embeddings": False, "bos_token_id": ids["<|im_start|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"], "initializer_range": 0.02,
        },
        vision_config={
            "depth": 4, "hidden_size": 40, "intermediate_size": 68, "num_heads": 2, "in_channels": 3,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
            "out_hidden_size": 72, "fullatt_block_indexes": [1, 3], "hidden_act": "silu",
        },
        audio_config={
            "num_mel_bins": 128, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 68,
            "d_model": 40, "max_source_positions": 1500, "n_window": 100, "output_dim": 72,
            "activation_function": "gelu",
        },
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        # Not declared fields of Qwen2_5OmniThinkerConfig in 5.23, but get_rope_index reads them: the published
        # thinker_config carries them (151652 / 151653) and so must ours.
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        user_token_id=user_id, position_id_per_seconds=25, seconds_per_chunk=2,
        bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )


def _reinit(module: torch.nn.Module, std: float, generator: torch.Generator) -> None:
    """Linear weights ~ N(0, std), conv weights ~ N(0, 3/sqrt(fan_in)), biases ~ N(0, 0.02), norm gains ~ N(1, 0.1), embeddings ~ N(0, 1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator) if name.endswith("weight")
                        else 0.02 * torch.randn(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
            elif p.ndim >= 2:
                # convs (audio conv1/conv2, vision patch_embed): N(0, 3/sqrt(fan_in)) so their outputs are O(1)
                # and not drowned by the audio tower's sinusoidal positions (else audio barely changes the answer)
                scale = std if p.ndim == 2 else 3.0 / p[0].numel() ** 0.5
                p.copy_(scale * torch.randn(p.shape, generator=generator))


def widen_init(model: Qwen2_5OmniThinkerForConditionalGeneration, generator: torch.Generator,
               never_predicted: list[int]) -> None:
    """Weights whose greedy output depends on text, image and audio and is not one repeated token."""
    _reinit(model.model.language_model, 0.1, generator)
    _reinit(model.model.visual, 0.1, generator)        # includes visual.merger (vision -> text projector)
    _reinit(model.model.audio_tower, 0.1, generator)   # includes audio_tower.proj (audio -> text projector)
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.normal_(0.0, 1.0, generator=generator)
        model.lm_head.weight.normal_(0.0, 0.2, generator=generator)
        # specials and the padding rows: strongly negative logit direction is not available without a bias,
        # so zero their rows (logit 0 while real tokens spread over +-3): answers run to max_new_tokens.
        model.lm_head.weight[never_predicted] = 0.0


def write_qwen25_omni_checkpoint(directory: Path, seed: int = 0) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = thinker_config(tokenizer)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    first_special = tokenizer.convert_tokens_to_ids(SPECIALS[0])
    widen_init(model, generator, list(range(first_special, config.text_config.vocab_size)))
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="200KB")
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>")],
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    return directory



class WithoutVideo:
    """A Qwen processor (mixed in first) built with ``video_processor=None``: its video processor needs torchvision,
    which is not installed; images and audio run HF's own code."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


class NoVideoQwen2_5OmniProcessor(WithoutVideo, Qwen2_5OmniProcessor):
    @property
    def model_input_names(self):
        names = (self.tokenizer.model_input_names + self.feature_extractor.model_input_names
                 + self.image_processor.model_input_names + ["feature_attention_mask"])
        return list(dict.fromkeys(names))


def load_processor(directory: str | Path) -> Qwen2_5OmniProcessor:
    directory = Path(directory)
    template_file = directory / "chat_template.json"
    chat_template = (json.loads(template_file.read_text())["chat_template"] if template_file.exists()
                     else (directory / "chat_template.jinja").read_text())
    return NoVideoQwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(directory),
        video_processor=None,
        feature_extractor=WhisperFeatureExtractor.from_pretrained(directory),
        tokenizer=AutoTokenizer.from_pretrained(directory),
        chat_template=chat_template,
    )


def omni_pipeline_generate(model, processor, text: str, images: list, audio: list[bytes], max_new_tokens: int,
                           system_prompt: str | None = None) -> list[int]:
    """HF's own pipeline on one user turn (images, then audio, then the text) after an optional system turn: see
    :func:`tests.hf_checkpoints.template_then_processor_generate`."""
    content = ([{"type": "image", "image": image} for image in images]
               + [{"type": "audio", "audio": f"clip{i}.wav"} for i in range(len(audio))] + [{"type": "text", "text": text}])
    system = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt is not None else []
    return template_then_processor_generate(model, processor, [*system, {"role": "user", "content": content}],
                                            max_new_tokens, images, audio)
