"""Tiny checkpoints written by transformers' own classes, laid out as published ones are, and HF's pipeline.

Not the preset: no key this project invented, sizes unlike any default, several BF16 shards, the
checkpoint's own chat template with a default system prompt (Mistral Small 3.x's structure), a
``PixtralImageProcessor`` config. ``hf_pipeline_generate`` is the reference a user would run:
the processor's ``apply_chat_template`` + ``generate``.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessorPil, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from builder.source.tiny import widen_init

MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
                    "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
# The structure of Mistral Small 3.1's template: a default system prompt with today's date, the
# system message taken from the messages when there is one, images as [IMG] inside [INST].
MISTRAL_SMALL_TEMPLATE = """{%- set today = strftime_now("%Y-%m-%d") %}
{%- set default_system_message = "You are a small test model. The current date is " + today + "." %}

{{- bos_token }}

{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set system_message = messages[0]['content'] %}
    {%- else %}
        {%- set system_message = messages[0]['content'][0]['text'] %}
    {%- endif %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = default_system_message %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}

{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if message['content'] is string %}
            {{- '[INST]' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST]' }}
            {%- for block in message['content'] %}
                {%- if block['type'] == 'text' %}
                    {{- block['text'] }}
                {%- elif block['type'] in ['image', 'image_url'] %}
                    {{- '[IMG]' }}
                {%- else %}
                    {{- raise_exception('Only text and image blocks are supported in message content!') }}
                {%- endif %}
            {%- endfor %}
            {{- '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user, system and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}"""
CORPUS = [
    "What is in the picture? Describe the colours and the shapes you see.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "You are a small test model. The current date is today.",
    "Täglich grüßt das Murmeltier; ¿qué hora es? 東京は晴れです。",
]

# Tekken's split pattern as Mistral's tekken.json files carry it
PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
           r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Mistral's first 20 control tokens in their order, fillers, then Voxtral's audio tokens at their ranks
SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
            "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
            *(f"<SPECIAL_{i}>" for i in range(20, 24)), "[AUDIO]", "[BEGIN_AUDIO]",
            *(f"<SPECIAL_{i}>" for i in range(26, 34)), "[TRANSCRIBE]"]
NUM_SPECIAL = 40  # more than listed: the rest are <SPECIAL_i> fillers, as in Mistral's files (1000 there)
UNUSED_TAIL = 5  # vocab entries past default_vocab_size, which both readers drop (150000 listed, 131072 used)
TEKKEN_CORPUS = ["Hello world, the quick brown fox jumps over the lazy dog. ", "café naïve résumé über Straße ",
                 "日本語のテキストです。中文字符 ", "emoji 🙂👍🏽 ", "    indented code\n\tand tabs\n", "numbers 1234 3.14 "] * 20
SYSTEM_PROMPT = ("You are {name}, a Large Language Model (LLM) created by Mistral AI.\n"
                 "The current date is {today}. \"yesterday\" is {yesterday}. Reply as JSON: {\"answer\": ...}\n")


def bpe_tokenizer(specials: list[str], vocab_size: int = 420) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences: real merges, so text tokenization is not trivial."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_mistral3_checkpoint(directory: Path, seed: int = 3, tie_word_embeddings: bool = True) -> Path:
    """A vision-only Mistral-3 checkpoint: odd sizes, 3+ BF16 shards, template with a default system prompt. Its lm_head
    is the embedding table unless ``tie_word_embeddings`` is False (as in Mistral Small's own config)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = bpe_tokenizer(MISTRAL_SPECIALS)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in MISTRAL_SPECIALS}
    config = Mistral3Config(
        text_config={
            "model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": 48, "intermediate_size": 80,
            "num_hidden_layers": 3, "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 16,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 1_000_000.0,
            "bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "tie_word_embeddings": False,
        },
        vision_config={
            "model_type": "pixtral", "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 2,
            "num_attention_heads": 2, "head_dim": 12, "patch_size": 6, "image_size": 72, "num_channels": 3,
            "rope_theta": 10000.0,
        },
        image_token_index=ids["[IMG]"], spatial_merge_size=2, vision_feature_layer=-1,
        projector_hidden_act="gelu", multimodal_projector_bias=False, tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).eval()
    widen_init(model, torch.Generator().manual_seed(seed), special_tokens=len(MISTRAL_SPECIALS))
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="60KB")
    tokenizer.save_pretrained(directory)
    (directory / "chat_template.jinja").write_text(MISTRAL_SMALL_TEMPLATE)
    PixtralImageProcessorPil(
        size={"longest_edge": 72}, patch_size={"height": 6, "width": 6},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(directory)
    (directory / "processor_config.json").write_text(json.dumps({
        "processor_class": "PixtralProcessor", "patch_size": 6, "spatial_merge_size": 2, "image_token": "[IMG]",
        "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]",
    }))
    return directory


def pixtral_processor(directory: Path):
    """HF's own PixtralProcessor for ``directory``.

    Its module imports the torchvision image processor only for ``get_resize_output_image_size``,
    and torchvision does not import beside the CPU torch here; HF's PIL module has the same function.
    """
    import transformers.models.pixtral.image_processing_pil_pixtral as pil

    sys.modules.setdefault("transformers.models.pixtral.image_processing_pixtral", pil)
    from transformers.models.pixtral.processing_pixtral import PixtralProcessor

    processor_config = json.loads((directory / "processor_config.json").read_text())
    processor_config.pop("processor_class")
    return PixtralProcessor(
        image_processor=PixtralImageProcessorPil.from_pretrained(directory),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(directory),
        chat_template=(directory / "chat_template.jinja").read_text(), **processor_config,
    )


def hf_messages(text: str, images: list, system_prompt: str | None = None) -> list[dict]:
    """The request as HF's examples write it: media first, then the text; an optional system turn."""
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return [*system, {"role": "user", "content": content}]


@torch.no_grad()
def hf_pipeline_generate(model, processor, text: str, images: list, system_prompt: str | None, max_new_tokens: int,
                         sanitize_control_tokens: bool = False) -> list[int]:
    """``sanitize_control_tokens``: HF's own way of keeping control tokens typed by a user plain text."""
    inputs = processor.apply_chat_template(
        hf_messages(text, images, system_prompt), add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt", sanitize_control_tokens=sanitize_control_tokens,
    )
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def hf_conversation(messages: list[dict], **media: list) -> list[dict]:
    """A conversation as a client sends it in ``messages`` (media parts ``{"type", "index"}`` naming the request's
    files) as HF's examples write it for ``apply_chat_template``: each media part holding its item, e.g.
    ``image=[PIL images]`` or ``audio_url=[names]`` (the key the family's template and processor read), or
    ``audio=[{"base64": ...}]`` (items that are dicts give the part's keys themselves, e.g. mistral-common's)."""
    def part(item: dict) -> dict:
        if item["type"] == "text":
            return item
        key = next(k for k in media if k.startswith(item["type"]))
        held = media[key][item["index"]]
        return {"type": item["type"], **(held if isinstance(held, dict) else {key: held})}

    return [{**m, "content": m["content"] if isinstance(m["content"], str) else [part(p) for p in m["content"]]}
            for m in messages]


def hf_conversation_inputs(processor, conversation: list[dict]) -> dict:
    """The processor's ``apply_chat_template`` on a conversation whose parts hold their media (tokenized, with them)."""
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


@torch.no_grad()
def hf_conversation_generate(model, processor, conversation: list[dict], max_new_tokens: int) -> list[int]:
    """HF's own pipeline on a conversation whose parts hold their media: :func:`hf_conversation_inputs` + greedy
    ``generate``."""
    inputs = hf_conversation_inputs(processor, conversation)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def load_reference_model(directory: Path) -> Mistral3ForConditionalGeneration:
    return Mistral3ForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()


def image(seed: int, width: int, height: int):
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


def png(picture) -> bytes:
    """A PIL image as the PNG file a client sends."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def tekken_ranks() -> list[bytes]:
    """Byte sequences by rank: the 256 bytes in order, then a trained BPE's tokens in merge order."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PATTERN), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trained.train_from_iterator(TEKKEN_CORPUS, trainers.BpeTrainer(
        vocab_size=256 + 120, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    by_id = sorted(trained.get_vocab().items(), key=lambda item: item[1])
    merged = [token for token in (bytes(to_byte[c] for c in text) for text, _ in by_id) if len(token) > 1]
    return [bytes([byte]) for byte in range(256)] + merged


def tekken_json(ranks: list[bytes], version: int = 11, audio: dict | None = None) -> dict:
    """Mistral's tekken.json for ``ranks``: Mistral's control tokens first, a tail past the vocabulary size;
    ``audio``: mistral-common's audio section (Voxtral's)."""
    return {
        "config": {"pattern": PATTERN, "num_vocab_tokens": len(ranks), "default_vocab_size":
                   len(ranks) - UNUSED_TAIL + NUM_SPECIAL, "default_num_special_tokens": NUM_SPECIAL,
                   "version": f"v{version}"},
        "vocab": [{"rank": rank, "token_bytes": base64.b64encode(token).decode(),
                   "token_str": token.decode("utf-8", "replace")} for rank, token in enumerate(ranks)],
        "special_tokens": [{"rank": rank, "token_str": token, "is_control": True} for rank, token in enumerate(SPECIALS)],
        "image": {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2},
        **({"audio": audio} if audio else {}),
        "version": version,
        "type": "Tekkenizer",
    }


# Voxtral Mini's audio section of tekken.json: 128 mel bins, 30 s windows of 375 tokens (12.5 per second).
VOXTRAL_AUDIO = {"sampling_rate": 16000, "frame_rate": 12.5, "chunk_length_s": 30.0,
                 "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400}}


def write_voxtral_checkpoint(directory: Path, seed: int = 5) -> Path:
    """Voxtral as Mistral publishes it: VoxtralConfig, BF16 shards, tekken.json (v7, with its audio section) as the
    only tokenizer, a WhisperFeatureExtractor file, no chat template. Odd sizes; the real 1500-position encoder
    (30 s windows) with a tiny width."""
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration, WhisperFeatureExtractor

    directory.mkdir(parents=True, exist_ok=True)
    tekken = tekken_json(tekken_ranks(), version=7, audio=VOXTRAL_AUDIO)
    config = VoxtralConfig(
        audio_config={"num_mel_bins": 128, "hidden_size": 20, "intermediate_size": 80, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "max_source_positions": 1500},
        text_config={"model_type": "llama", "vocab_size": tekken["config"]["default_vocab_size"], "hidden_size": 44,
                     "intermediate_size": 76, "num_hidden_layers": 3, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096, "rope_theta": 1e8,
                     "bos_token_id": SPECIALS.index("<s>"), "eos_token_id": SPECIALS.index("</s>")},
        audio_token_id=SPECIALS.index("[AUDIO]"),
    )
    torch.manual_seed(seed)
    model = VoxtralForConditionalGeneration(config).eval()
    widen_init(model, torch.Generator().manual_seed(seed), special_tokens=NUM_SPECIAL)
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="60KB")
    WhisperFeatureExtractor(feature_size=128).save_pretrained(directory)
    (directory / "tekken.json").write_text(json.dumps(tekken), encoding="utf-8")
    return directory


def base64_audio(clips: list[bytes]) -> list[dict[str, str]]:
    """Audio parts' items as VoxtralProcessor (mistral-common) reads them: the files in base64."""
    return [{"base64": base64.b64encode(clip).decode()} for clip in clips]


def voxtral_pipeline_generate(model, processor, text: str, audio: list[bytes], max_new_tokens: int,
                              system_prompt: str | None = None) -> list[int]:
    """HF's own Voxtral pipeline: ``VoxtralProcessor.apply_chat_template`` (mistral-common decodes, resamples and
    tokenizes the audio) + ``generate``."""
    content = [{"type": "audio", **item} for item in base64_audio(audio)]
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return hf_conversation_generate(model, processor, [*system, {"role": "user", "content": [*content, {"type": "text", "text": text}]}],
                                    max_new_tokens)


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
# Qwen/Qwen2-Audio-7B-Instruct's chat template as published (transformers 4.45's Qwen2AudioProcessor default, which
# mirrors the hub's; 5.23's default also tests content['type']): it finds audio blocks by their "audio" key.
QWEN2_AUDIO_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content %}{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_qwen2_audio_checkpoint(directory: Path, seed: int = 7) -> Path:
    """Qwen2-Audio as Qwen publishes it: Qwen2AudioConfig, BF16 shards, tokenizer.json, the published template, a
    WhisperFeatureExtractor (128 mels, 30 s) and the processor files. Odd sizes; the real 1500-position encoder."""
    from transformers import (Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor,
                              WhisperFeatureExtractor)

    from builder.source.tiny import _reinit

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = bpe_tokenizer(QWEN_SPECIALS)
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = None, "<|im_end|>", "<|endoftext|>"
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIALS}
    config = Qwen2AudioConfig(
        audio_config={"num_mel_bins": 128, "d_model": 36, "encoder_layers": 2, "encoder_attention_heads": 3,
                      "encoder_ffn_dim": 80, "max_source_positions": 1500},
        text_config={"model_type": "qwen2", "vocab_size": len(tokenizer) + 11, "hidden_size": 56,
                     "intermediate_size": 120, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "head_dim": 16, "max_position_embeddings": 8192, "rope_theta": 10000.0, "tie_word_embeddings": False,
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]},
        audio_token_index=ids["<|AUDIO|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    widen_init(model, generator, special_tokens=len(QWEN_SPECIALS))
    _reinit(model.model.audio_tower, 0.1, generator)  # so that what a clip holds changes the answer
    with torch.no_grad():
        model.lm_head.weight[len(tokenizer):] = 0.0  # the vocabulary's padded tail is never predicted
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="120KB")
    features = WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)
    Qwen2AudioProcessor(feature_extractor=features, tokenizer=tokenizer, chat_template=QWEN2_AUDIO_TEMPLATE).save_pretrained(directory)
    features.save_pretrained(directory)  # transformers 5 nests it in processor_config.json; the hub has this file
    return directory


def load_16k(clip: bytes) -> np.ndarray:
    """A WAV file as HF's audio examples load it (``librosa.load(path, sr=16000)``): soundfile, mono, soxr HQ."""
    import io

    import soundfile
    import soxr

    samples, rate = soundfile.read(io.BytesIO(clip), dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    return mono if rate == 16000 else soxr.resample(mono, rate, 16000, quality="HQ")


def qwen2_audio_pipeline_generate(model, processor, text: str, audio: list[bytes], max_new_tokens: int,
                                  system_prompt: str | None = None) -> list[int]:
    """HF's own Qwen2-Audio pipeline, as its model card runs it: the template, then the processor on 16 kHz audio."""
    content = [{"type": "audio", "audio_url": f"clip{i}.wav"} for i in range(len(audio))]
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    conversation = [*system, {"role": "user", "content": [*content, {"type": "text", "text": text}]}]
    return template_then_processor_generate(model, processor, conversation, max_new_tokens, audio=audio)


def template_then_processor_inputs(processor, conversation: list[dict], images: list = (), audio: list[bytes] = ()) -> dict:
    """As the Qwen model cards run a conversation (media parts naming their items, not holding them): the template's
    text, then the processor on the PIL ``images`` and on the ``audio`` files loaded at 16 kHz, in the order the
    conversation names them."""
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    media = {"images": list(images)} if images else {}
    if audio:
        media |= {"audio": [load_16k(clip) for clip in audio], "sampling_rate": 16000}
    return processor(text=prompt, **media, return_tensors="pt")


def template_then_processor_generate(model, processor, conversation: list[dict], max_new_tokens: int,
                                     images: list = (), audio: list[bytes] = ()) -> list[int]:
    """:func:`template_then_processor_inputs`, then greedy ``generate``."""
    inputs = template_then_processor_inputs(processor, conversation, images, audio)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()
