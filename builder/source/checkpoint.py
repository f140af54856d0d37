"""Loads a local Hugging Face checkpoint directory and splits it into components.

Supported: ``mistral3`` checkpoints (Pixtral vision + Mistral decoder), optionally with a Voxtral
audio tower and projector described by ``audio_config`` (what the tiny preset writes). Weights are
read from safetensors only: pickle files are never loaded, and no remote code is run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import Mistral3Config, Mistral3ForConditionalGeneration
from transformers.utils import logging as hf_logging

from builder.errors import BuildError
from builder.runtime.model_facts import ModelFacts
from builder.runtime.prompt import SpecialTokens
from builder.source.audio_modules import build_audio_modules

SUPPORTED_ARCHITECTURES = ("mistral3",)
_AUDIO_PREFIXES = ("audio_tower.", "audio_projector.")


@dataclass
class SourceModel:
    """The PyTorch modules of one checkpoint, in eval mode."""

    directory: Path
    model: Mistral3ForConditionalGeneration
    audio_tower: torch.nn.Module | None
    audio_projector: torch.nn.Module | None
    facts: ModelFacts


def load_checkpoint(directory: Path) -> SourceModel:
    weight_files = check_checkpoint_files(directory)
    facts = read_facts(directory)
    config = Mistral3Config.from_pretrained(directory)
    model = _load_model(directory, config)
    audio_tower = audio_projector = None
    if getattr(config, "audio_config", None):
        audio_tower, audio_projector = build_audio_modules(config)
        _load_prefixed(weight_files, "audio_tower.", audio_tower)
        _load_prefixed(weight_files, "audio_projector.", audio_projector)
    return SourceModel(directory, model, audio_tower, audio_projector, facts)


def check_checkpoint_files(directory: Path) -> list[Path]:
    """The cheap checks (layout, architecture, safetensors headers); returns the weight files."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BuildError(f"checkpoint directory not found: {directory}")
    if not any(directory.iterdir()):
        raise BuildError(f"checkpoint directory is empty: {directory}")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise BuildError(f"{directory}: no config.json (expected a Hugging Face save_pretrained directory)")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise BuildError(f"{config_path}: not valid JSON ({exc})") from None
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise BuildError(
            f"{config_path}: unsupported architecture model_type={model_type!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    weight_files = sorted(directory.glob("*.safetensors"))
    if not weight_files:
        pickles = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        what = f"only pickle weights ({', '.join(pickles)}), which are never loaded" if pickles else "no weights"
        raise BuildError(f"{directory}: {what}; convert the checkpoint to safetensors")
    for path in weight_files:
        _check_safetensors(path)
    if not (directory / "tokenizer.json").is_file():
        raise BuildError(f"{directory}: no tokenizer.json (a fast tokenizer file is required)")
    return weight_files


def _check_safetensors(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise BuildError(f"{path}: not a readable safetensors file ({exc}); the file may be truncated") from None


def _load_model(directory: Path, config: Mistral3Config) -> Mistral3ForConditionalGeneration:
    # transformers logs unexpected keys (our audio weights) as warnings; missing ones we check ourselves.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = Mistral3ForConditionalGeneration.from_pretrained(
            directory, config=config, use_safetensors=True, trust_remote_code=False,
            output_loading_info=True, dtype=torch.float32,
        )
    except (RuntimeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BuildError(f"{directory}: weights do not match config.json: {first}") from None
    mismatched = info.get("mismatched_keys") or []
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(_AUDIO_PREFIXES)]
    if missing or mismatched:
        names = ", ".join(list(missing)[:3] + [str(m[0]) if isinstance(m, tuple) else str(m) for m in mismatched][:3])
        raise BuildError(f"{directory}: weights do not match config.json ({len(missing)} missing, {len(mismatched)} mismatched: {names})")
    return model.eval()


def _load_prefixed(weight_files: list[Path], prefix: str, module: torch.nn.Module) -> None:
    state = {}
    for path in weight_files:
        with safe_open(str(path), framework="pt") as handle:
            state.update({k[len(prefix):]: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)})
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BuildError(f"{prefix.rstrip('.')} weights do not match audio_config: {str(exc).splitlines()[0]}") from None
    module.eval()


def read_facts(directory: Path) -> ModelFacts:
    """What serving needs to know, from config.json and tokenizer.json alone (no weights loaded)."""
    config = Mistral3Config.from_pretrained(directory)
    has_audio = bool(getattr(config, "audio_config", None))
    vocab = json.loads((directory / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}

    def token(name: str) -> int:
        if name not in added:
            raise BuildError(f"{directory}/tokenizer.json: special token {name} is missing")
        return int(added[name])

    tokens = SpecialTokens(
        bos=token("<s>"), eos=token("</s>"), inst=token("[INST]"), inst_end=token("[/INST]"),
        image=token("[IMG]"), image_break=token("[IMG_BREAK]"), image_end=token("[IMG_END]"),
        audio=token("[AUDIO]") if has_audio else -1,
        begin_audio=token("[BEGIN_AUDIO]") if has_audio else -1,
    )
    if tokens.image != config.image_token_index:
        raise BuildError(f"{directory}: [IMG] is token {tokens.image} in tokenizer.json but {config.image_token_index} in config.json")
    preprocessor = directory / "preprocessor_config.json"
    pre = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
    text, vision = config.text_config, config.vision_config
    image_size = int(vision.image_size)
    grid = image_size // (vision.patch_size * config.spatial_merge_size)
    audio = config.audio_config or {}
    max_positions = int(audio.get("max_source_positions", 0))
    return ModelFacts(
        tokens=tokens,
        vocab_size=int(text.vocab_size),
        hidden_size=int(text.hidden_size),
        num_layers=int(text.num_hidden_layers),
        num_kv_heads=int(text.num_key_value_heads),
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads),
        image_size=image_size,
        image_grid=(grid, grid),
        image_mean=tuple(pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073])),
        image_std=tuple(pre.get("image_std", [0.26862954, 0.26130258, 0.27577711])),
        num_mel_bins=int(audio.get("num_mel_bins", 0)),
        # Whisper-style: 2 mel frames per encoder position, 160 samples (10 ms) per frame.
        clip_samples=2 * max_positions * 160,
        audio_tokens_per_clip=max_positions * int(audio.get("hidden_size", 1)) // int(audio.get("intermediate_size", 1))
        if has_audio else 0,
    )
