"""Loads a local Hugging Face checkpoint directory through its model family.

The generic checks live here (layout, safetensors only, readable headers): pickle files are never
loaded and no remote code is run. What differs between model types is in :mod:`builder.families`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from builder.errors import BuildError
from builder.families import family_for
from builder.families.base import Family, SourceModel
from builder.runtime.model_facts import ModelFacts
from builder.source.tokenizer_files import serving_tokenizer, tokenizer_source

__all__ = ["Checkpoint", "SourceModel", "check_checkpoint", "load_checkpoint", "read_facts"]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory that passed the cheap checks, with its family resolved once."""

    directory: Path
    family: Family
    weight_files: tuple[Path, ...]

    def load(self, dtype: str = "float32", tokenizer: Path | None = None, layers_on_demand: bool = False) -> SourceModel:
        """``dtype``: what the weights are cast to as they load (a BF16 checkpoint never exists in FP32 for an FP16
        build); ``tokenizer``: the ``tokenizer.json`` it serves with (default: :func:`serving_tokenizer`'s);
        ``layers_on_demand``: each decoder layer read from the shards only while it runs, so the model is never
        whole in memory (the build: the LLM graph is written from the shards, its parity check runs layer by layer)."""
        return self.family.load(self.directory, dtype, tokenizer or serving_tokenizer(self.directory), layers_on_demand)

    def read_facts(self, tokenizer: Path | None = None) -> ModelFacts:
        """What serving needs to know, from config, tokenizer and processor files alone (no weights loaded)."""
        return self.family.read_facts(self.directory, tokenizer or serving_tokenizer(self.directory))


def load_checkpoint(directory: Path, dtype: str = "float32", tokenizer: Path | None = None) -> SourceModel:
    return check_checkpoint(directory).load(dtype, tokenizer)


def read_facts(directory: Path, tokenizer: Path | None = None) -> ModelFacts:
    return check_checkpoint(directory).read_facts(tokenizer)


def check_checkpoint(directory: Path) -> Checkpoint:
    """The cheap checks (layout, architecture, safetensors headers), before any weight is read."""
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
    family = family_for(directory)  # an unsupported model_type stops here
    weight_files = sorted(directory.glob("*.safetensors"))
    if not weight_files:
        pickles = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        what = f"only pickle weights ({', '.join(pickles)}), which are never loaded" if pickles else "no weights"
        raise BuildError(f"{directory}: {what}; convert the checkpoint to safetensors")
    for path in weight_files:
        _check_safetensors(path)
    tokenizer_source(directory)  # tokenizer.json, or Mistral's tekken.json to convert
    return Checkpoint(directory, family, tuple(weight_files))


def _check_safetensors(path: Path) -> None:
    try:
        with safe_open(str(path), framework="np") as handle:  # "pt" would import torch for a header check
            handle.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise BuildError(f"{path}: not a readable safetensors file ({exc}); the file may be truncated") from None
