"""A tiny Gemma 3 checkpoint written by transformers' own classes, laid out as Google publishes gemma-3-4b-it.

``Gemma3Config`` with 4 decoder layers (sliding, sliding, full, sliding; a window of 10 that test prompts cross),
``query_pre_attn_scalar`` unlike head_dim, linear RoPE scaling on the full layers, SigLIP at 72 px (16 tokens per
image); BF16 shards with no ``lm_head`` (tied); a ``GemmaTokenizer`` in Gemma's id order; the published chat template
(google/gemma-3-4b-it, byte for byte: as quoted verbatim by gorilla's BFCL Gemma handler and onnxruntime-extensions);
the published ``preprocessor_config.json`` / ``processor_config.json`` layout and ``generation_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, trainers
from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor,
                          GemmaTokenizer, GenerationConfig)

from tests.hf_checkpoints import hf_conversation_generate

# The published template, as quoted (JSON-escaped) in tokenizer_config.json.
GEMMA3_CHAT_TEMPLATE = json.loads(
    r'''"{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"'''
)

HEAD_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
TAIL_SPECIALS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
CORPUS = [
    "What is in the picture? Describe the colours and the shapes you see.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "You are a helpful assistant. Answer briefly and precisely.",
    "Hello! How many Zebras, Kites or Jugs? Quiet Vans: 0123456789 (x+y)=z; [a-b] {c/d} \"e\" 'f' #g $h %i &j *k @l ^m _n `o |p ~q <r> \\s",
    "Täglich grüßt das Murmeltier; ¿qué hora es? 東京は晴れです。",
    # newline runs, so "\n", "\n\n" and "\n\n\n" become tokens as in Gemma's vocabulary (where "\n\n" is one
    # token): the image expansion's "\n\n" then merges with a neighbouring "\n" ("user\n" + "\n\n" -> one
    # "\n\n\n" token), which splicing token ids instead of expanding the text would get wrong
    "user\n\n\nHello\n\nworld\n", "model\nYes.\n\nNo.\n\n\nMaybe\n",
]

TEXT = dict(
    hidden_size=48, intermediate_size=88, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1,
    head_dim=16, query_pre_attn_scalar=20, sliding_window=10,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
    max_position_embeddings=4096, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
    final_logit_softcapping=None, attn_logit_softcapping=None,
)
VISION = dict(
    model_type="siglip_vision_model", hidden_size=32, intermediate_size=56, num_hidden_layers=2,
    num_attention_heads=2, num_channels=3, image_size=72, patch_size=6, layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh", vision_use_head=False,
)
MM_TOKENS_PER_IMAGE = 16


def gemma_tokenizer() -> GemmaTokenizer:
    """A GemmaTokenizer over a BPE trained with Gemma's normalizer (" " -> "▁"), byte-fallback tokens in the vocab."""
    trained = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    trained.normalizer = normalizers.Replace(" ", "▁")
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=360, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    vocab: dict[str, int] = {}
    for token in [*HEAD_SPECIALS, *(f"<0x{b:02X}>" for b in range(256)),
                  *sorted(model["vocab"], key=model["vocab"].get), *TAIL_SPECIALS]:
        vocab.setdefault(token, len(vocab))
    tokenizer = GemmaTokenizer(
        vocab=vocab, merges=[tuple(m) for m in model["merges"]], add_bos_token=True,
        extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                              "eoi_token": "<end_of_image>"},
    )
    # Gemma's turn markers are special added tokens (never split, dropped by skip_special_tokens)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<start_of_turn>", "<end_of_turn>")],
                         special_tokens=True)
    assert tokenizer.convert_tokens_to_ids(HEAD_SPECIALS) == list(range(len(HEAD_SPECIALS)))
    return tokenizer


def _normal_(tensor: torch.Tensor, std: float, generator: torch.Generator) -> None:
    tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std)


@torch.no_grad()
def gemma_widen_init(model: Gemma3ForConditionalGeneration, generator: torch.Generator, special_ids: list[int]) -> None:
    """Weights whose greedy output depends on the prompt and the image (>= 8 distinct tokens in 16).

    - Decoder and projector: every tensor N(0, 0.1), RMSNorm weights too (Gemma's norm is ``x * (1 + w)``, so a
      wrong ``w`` vs ``1 + w`` shows).
    - ``post_attention_layernorm`` / ``post_feedforward_layernorm`` weights shifted by +1 (gain ~2) and
      ``q_norm`` / ``k_norm`` by +2 (gain ~3, sharper, content-dependent attention). Without these, the embeddings
      being tied to ``lm_head`` make the current token's own row win (its scaled embedding sits in the residual
      stream): greedy output was 1-2 distinct tokens in 16 (see NOTES.md).
    - Embeddings (= lm_head, tied as in the published checkpoints): N(0, 0.1). Stored values are multiplied by
      sqrt(48) = 6.93 on lookup, so text inputs have RMS ~0.69, below the layers' contributions (same reason).
    - Projector matrix N(0, 0.25) (zeros by default, which would make every image identical to the decoder).
    - Special-token rows (<pad> <eos> <bos> <unk> <mask> <start_of_turn> <end_of_turn> <start_of_image>
      <end_of_image> <image_soft_token>) shrunk 20x: their logits stay near 0 while the max over ~600 ordinary rows
      is several sigma above, so greedy never stops early (fixed-length answers in tests); as inputs they keep
      their direction (RMSNorm restores the scale).
    """
    language_model = model.model.language_model
    embed = model.get_input_embeddings().weight
    for name, parameter in language_model.named_parameters():
        if parameter is embed:
            continue
        _normal_(parameter, 0.1, generator)
        if "post_attention_layernorm" in name or "post_feedforward_layernorm" in name:
            parameter += 1.0
        elif "q_norm" in name or "k_norm" in name:
            parameter += 2.0
    for parameter in model.model.multi_modal_projector.parameters():
        _normal_(parameter, 0.1, generator)
    _normal_(model.model.multi_modal_projector.mm_input_projection_weight, 0.25, generator)
    _normal_(embed, 0.1, generator)
    embed[special_ids] *= 0.05
    assert model.lm_head.weight.data_ptr() == embed.data_ptr(), "lm_head is expected to be tied to the embeddings"


def write_gemma3_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Gemma 3 as Google publishes it (see the module docstring), odd sizes, a sliding window the prompts cross."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = gemma_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in HEAD_SPECIALS + TAIL_SPECIALS}
    config = Gemma3Config(
        text_config={"model_type": "gemma3_text", "vocab_size": len(tokenizer), "pad_token_id": ids["<pad>"],
                     "eos_token_id": ids["<eos>"], "bos_token_id": ids["<bos>"], **TEXT},
        vision_config=VISION,
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    gemma_widen_init(model, torch.Generator().manual_seed(seed), special_ids=sorted(ids.values()))
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]], pad_token_id=ids["<pad>"],
        do_sample=True, top_k=64, top_p=0.95, cache_implementation="hybrid",
    )
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="60KB")

    image_processor = Gemma3ImageProcessorPil(
        size={"height": VISION["image_size"], "width": VISION["image_size"]}, resample=2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], rescale_factor=1 / 255,
        do_resize=True, do_rescale=True, do_normalize=True,
    )
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=MM_TOKENS_PER_IMAGE)
    processor.save_pretrained(directory)
    # The published preprocessor_config.json (gemma-3-4b-it), with this model's size and sequence length:
    # the torchvision class name (AutoImageProcessor picks the PIL twin when torchvision is absent) and nulls
    # for the fields the processor fills (do_convert_rgb True, do_pan_and_scan False, crops 256 / 4 / 1.2).
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True,
        "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Gemma3ImageProcessor",
        "image_seq_length": MM_TOKENS_PER_IMAGE, "image_std": [0.5, 0.5, 0.5],
        "pan_and_scan_max_num_crops": None, "pan_and_scan_min_crop_size": None,
        "pan_and_scan_min_ratio_to_activate": None, "processor_class": "Gemma3Processor", "resample": 2,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": VISION["image_size"], "width": VISION["image_size"]},
    }, indent=2) + "\n")
    # processor.save_pretrained nests the image processor into processor_config.json (transformers 5); the
    # published file holds only this, the image processor living in preprocessor_config.json above.
    (directory / "processor_config.json").write_text(json.dumps(
        {"image_seq_length": MM_TOKENS_PER_IMAGE, "processor_class": "Gemma3Processor"}, indent=2) + "\n")
    return directory


def gemma3_pipeline_generate(model, processor, text: str, images: list, max_new_tokens: int,
                             system_prompt: str | None = None) -> list[int]:
    """HF's own Gemma 3 pipeline: the processor's ``apply_chat_template`` (images first, then the text) + ``generate``."""
    content = [*({"type": "image", "image": image} for image in images), {"type": "text", "text": text}]
    system = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    return hf_conversation_generate(model, processor, [*system, {"role": "user", "content": content}], max_new_tokens)
