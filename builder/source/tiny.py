"""The built-in presets, tri-modal models with seeded random weights saved as real checkpoints: ``tiny``
(2.8M parameters: the default build and the tests) and ``small`` (about 250M: a realistic size for
benchmarks, where the weights, not Python and gRPC, are the cost).

Architecture: ``Mistral3ForConditionalGeneration`` (Pixtral vision tower + patch-merger projector +
Mistral decoder, the layout of Magistral Small 1.2) plus Voxtral's Whisper-style audio tower and
projector feeding the same decoder. The audio parts are stored in the same ``model.safetensors``
under ``audio_tower.`` / ``audio_projector.``, described by ``audio_config`` in ``config.json``;
:mod:`builder.source.checkpoint` reads it back exactly as it reads a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessorPil, PreTrainedTokenizerFast

from builder.families.mistral3 import CLIP_MEAN, CLIP_STD, build_audio_modules
from builder.families.mistral_files import MISTRAL_INSTRUCT_TEMPLATE

# Special tokens first (ids 0..15), then the 256 byte-level tokens: any text round-trips.
SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[AUDIO]", "[BEGIN_AUDIO]",
] + [f"<special_{i}>" for i in range(10, 16)]


def tiny_config() -> Mistral3Config:
    return _config(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=1024),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
                    patch_size=8, image_size=64),
        # Voxtral-style audio encoder: 2 s clips (200 mel frames), 4 frames stacked per audio token.
        audio=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_mel_bins=16,
                   max_source_positions=100),
    )


def small_config() -> Mistral3Config:
    """About 250M parameters: a 190M decoder (16 layers of 1024, grouped-query attention), a 25M Pixtral
    tower on 224-pixel images (64 tokens each), a 30M Whisper-style audio tower on 10 s clips."""
    return _config(
        text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=64, max_position_embeddings=4096),
        vision=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, head_dim=64,
                    patch_size=14, image_size=224),
        # intermediate_size is also the projector's input: 4 encoder positions stacked per audio token, as Voxtral's.
        audio=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8, num_mel_bins=80,
                   max_source_positions=500),
    )


def _config(text: dict, vision: dict, audio: dict) -> Mistral3Config:
    vocab = len(SPECIAL_TOKENS) + 256
    ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    return Mistral3Config(
        text_config=dict(
            model_type="mistral", vocab_size=vocab, rms_norm_eps=1e-5,
            rope_theta=10000.0, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<unk>"],
            tie_word_embeddings=False, **text,
        ),
        vision_config=dict(model_type="pixtral", num_channels=3, rope_theta=10000.0, **vision),
        audio_config=dict(model_type="voxtral_encoder", **audio),
        image_token_index=ids["[IMG]"],
        audio_token_id=ids["[AUDIO]"],
        spatial_merge_size=2,
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<unk>"],
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def _reinit(module: torch.nn.Module, std: float, generator: torch.Generator) -> None:
    # HF's default std (0.02) makes random-weight greedy output repeat one token; a wider init (0.3,
    # unit-variance embeddings: tried side by side) makes the output vary with the prompt, the image
    # and the audio, so the end-to-end checks mean something.
    for name, param in module.named_parameters():
        if param.dim() >= 2:
            with torch.no_grad():
                param.normal_(0.0, std, generator=generator)


def widen_init(model: Mistral3ForConditionalGeneration, generator: torch.Generator, special_tokens: int) -> None:
    """Random weights whose greedy output varies with the prompt and the image (any Mistral-3 model).

    ``special_tokens``: ids below it are never predicted (EOS included), so answers have the requested
    length and are text.
    """
    _reinit(model.model.language_model, 0.3, generator)
    _reinit(model.model.multi_modal_projector, 0.3, generator)
    _reinit(model.lm_head, 0.3, generator)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0, generator=generator)
        model.lm_head.weight[:special_tokens] = 0.0


PRESETS = {"tiny": tiny_config, "small": small_config}


def write_preset_checkpoint(directory: Path, preset: str = "tiny", seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = PRESETS[preset]()
    model = Mistral3ForConditionalGeneration(config).eval()
    audio_tower, audio_projector = build_audio_modules(config)

    widen_init(model, generator, special_tokens=len(SPECIAL_TOKENS))
    _reinit(audio_projector, 0.3, generator)

    model.save_pretrained(directory, safe_serialization=True)
    weights_path = directory / "model.safetensors"
    weights = load_file(weights_path)
    weights.update({f"audio_tower.{k}": v.contiguous() for k, v in audio_tower.state_dict().items()})
    weights.update({f"audio_projector.{k}": v.contiguous() for k, v in audio_projector.state_dict().items()})
    save_file(weights, weights_path, metadata={"format": "pt"})
    write_tokenizer_and_processor(directory, config)
    return directory


def write_tokenizer_and_processor(directory: Path, config: Mistral3Config) -> None:
    """The preset's tokenizer and chat template, and the Pixtral processor files for ``config``'s vision tower."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = MISTRAL_INSTRUCT_TEMPLATE  # Mistral's layout, with [AUDIO] for audio items
    tokenizer.save_pretrained(directory)
    vision = config.vision_config
    PixtralImageProcessorPil(
        size={"longest_edge": vision.image_size}, patch_size={"height": vision.patch_size, "width": vision.patch_size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    ).save_pretrained(directory)
    # What PixtralProcessor.save_pretrained writes (it needs torchvision, which does not import here).
    (directory / "processor_config.json").write_text(json.dumps({
        "processor_class": "PixtralProcessor", "patch_size": vision.patch_size,
        "spatial_merge_size": config.spatial_merge_size, "image_token": "[IMG]",
        "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]",
    }, indent=2))
