"""Loads a local Hugging Face checkpoint directory through its model family.

The generic checks live here (layout, safetensors only, readable headers): pickle files are never
loaded and no remote code is run. What differs between model types is in :mod:`builder.families`.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from builder.errors import BuildError
from builder.families import family_for
from builder.families.base import SourceModel
from builder.runtime.model_facts import ModelFacts
from builder.source.tokenizer_files import serving_tokenizer, tokenizer_source

__all__ = ["SourceModel", "check_checkpoint_files", "load_checkpoint", "read_facts"]


def load_checkpoint(directory: Path, dtype: str = "float32", tokenizer: Path | None = None) -> SourceModel:
    """``dtype``: what the weights are cast to as they load (a BF16 checkpoint never exists in FP32 for an FP16
    build); ``tokenizer``: the ``tokenizer.json`` it serves with (default: :func:`serving_tokenizer`'s)."""
    check_checkpoint_files(directory)
    return family_for(directory).load(directory, dtype, tokenizer or serving_tokenizer(directory))


def read_facts(directory: Path, tokenizer: Path | None = None) -> ModelFacts:
    """What serving needs to know, from config, tokenizer and processor files alone (no weights loaded)."""
    return family_for(directory).read_facts(directory, tokenizer or serving_tokenizer(directory))


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
    if not isinstance(raw, dict):
        raise BuildError(f"{config_path}: expected a JSON object")
    family_for(directory)  # an unsupported model_type stops here, before any weight is read
    weight_files = sorted(directory.glob("*.safetensors"))
    if not weight_files:
        pickles = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        what = f"only pickle weights ({', '.join(pickles)}), which are never loaded" if pickles else "no weights"
        raise BuildError(f"{directory}: {what}; convert the checkpoint to safetensors")
    for path in weight_files:
        _check_safetensors(path)
    tokenizer_source(directory)  # tokenizer.json, or Mistral's tekken.json to convert
    return weight_files


def _check_safetensors(path: Path) -> None:
    try:
        with safe_open(str(path), framework="np") as handle:  # "pt" would import torch for a header check
            handle.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise BuildError(f"{path}: not a readable safetensors file ({exc}); the file may be truncated") from None
