"""What every family provides: facts for serving, PyTorch modules for export, the HF reference.

Stages call these methods and never branch on ``model_type`` themselves.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.families.hf_files import stop_ids
from builder.runtime.model_facts import AudioFacts, ImageFacts, ModelFacts
from builder.runtime.preprocess import ModelInputs

if TYPE_CHECKING:  # torch and the export stage load only when a family exports or runs its reference
    import numpy as np
    import torch

    from builder.export.recipes import ExportRecipe
    from builder.spec import LimitsSpec


@dataclass
class SourceModel:
    """The PyTorch modules of one checkpoint, in eval mode; ``parts`` are family-specific extras."""

    directory: Path
    model: "torch.nn.Module"
    facts: ModelFacts
    parts: dict[str, "torch.nn.Module"] = field(default_factory=dict)


class Family(ABC):
    MODEL_TYPE: str
    # Used when the checkpoint ships no chat template; documented in the README per family.
    DEFAULT_CHAT_TEMPLATE: str

    @abstractmethod
    def read_facts(self, directory: Path, tokenizer: Path) -> ModelFacts:
        """From config.json, the ``tokenizer`` file it serves with and processor files alone (no weights loaded)."""

    @abstractmethod
    def load(self, directory: Path, dtype: str, tokenizer: Path, layers_on_demand: bool = False) -> SourceModel:
        """The checkpoint's modules in ``dtype`` (a torch dtype's name), weights checked against its config;
        ``layers_on_demand``: the text decoder's layers read from the shards only while each runs (the build's)."""

    def recipes(self, source: SourceModel, limits: "LimitsSpec", components: list[str]) -> list["ExportRecipe"]:
        """How each of ``components`` (vision_encoder, audio_encoder, llm) exports: the ``RECIPES`` table of the
        family package's ``export`` module, imported here so that torch loads only when a family exports."""
        export = importlib.import_module(f"{type(self).__module__}.export")
        return [export.RECIPES[name](source, limits) for name in components]

    @abstractmethod
    def reference_generate(self, source: SourceModel, inputs: ModelInputs, max_new_tokens: int) -> list[int]:
        """Greedy new tokens of the source model's own ``generate`` on already preprocessed inputs."""


def model_facts(family: str, directory: Path, config: Any, image: ImageFacts | None, audio: AudioFacts | None) -> ModelFacts:
    """The facts of a checkpoint whose decoder is described by ``config.text_config`` (every family's so far)."""
    text = config.text_config
    return ModelFacts(
        family=family,
        vocab_size=int(text.vocab_size),
        hidden_size=int(text.hidden_size),
        num_layers=int(text.num_hidden_layers),
        num_kv_heads=int(text.num_key_value_heads),
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads),
        stop_ids=stop_ids(directory, config),
        image=image,
        audio=audio,
        max_positions=int(getattr(text, "max_position_embeddings", 0) or 0),
    )


def greedy_new_tokens(source: SourceModel, input_ids: "np.ndarray", max_new_tokens: int, **model_inputs: Any) -> list[int]:
    """The new tokens of the model's own greedy ``generate`` on a prompt's ids and its media tensors (numpy)."""
    import torch

    facts = source.facts
    ids = torch.from_numpy(input_ids)[None]
    tensors = {name: torch.from_numpy(value) for name, value in model_inputs.items()}
    with torch.no_grad():
        out = source.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), **tensors, max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=list(facts.stop_ids), pad_token_id=facts.stop_ids[0],
        )
    return out[0, ids.shape[1]:].tolist()
