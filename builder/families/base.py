"""What every family provides: facts for serving, PyTorch modules for export, the HF reference.

Stages call these methods and never branch on ``model_type`` themselves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from builder.runtime.model_facts import ModelFacts
from builder.runtime.preprocess import ModelInputs

if TYPE_CHECKING:  # torch and the export stage load only when a family exports or runs its reference
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
    def load(self, directory: Path, dtype: str, tokenizer: Path) -> SourceModel:
        """The checkpoint's modules in ``dtype`` (a torch dtype's name), weights checked against its config."""

    @abstractmethod
    def recipes(self, source: SourceModel, limits: "LimitsSpec", components: list[str]) -> list["ExportRecipe"]:
        """How each of ``components`` (vision_encoder, audio_encoder, llm) exports."""

    @abstractmethod
    def reference_generate(self, source: SourceModel, inputs: ModelInputs, max_new_tokens: int) -> list[int]:
        """Greedy new tokens of the source model's own ``generate`` on already preprocessed inputs."""
