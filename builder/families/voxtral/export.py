"""Voxtral's export: the Whisper-style audio tower + projector on whole 30 s windows."""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from builder.export.recipes import ExportRecipe, llm_recipe
from builder.families.base import SourceModel
from builder.families.voxtral import audio_embeddings
from builder.runtime.contract import AUDIO_EMBEDS, INPUT_FEATURES
from builder.spec import LimitsSpec


class AudioEncoder(nn.Module):
    """input_features [clips, mels, frames] -> audio_embeds [clips, tokens_per_clip, hidden]."""

    def __init__(self, tower: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.projector = projector

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        dtype = next(self.tower.parameters()).dtype
        embeds = audio_embeddings(self.tower, self.projector, input_features.to(dtype))
        return embeds.reshape(input_features.shape[0], -1, embeds.shape[-1]).float()


def audio_recipe(source: SourceModel, limits: LimitsSpec) -> ExportRecipe:
    audio = source.facts.audio
    assert audio is not None
    mels, frames = audio.num_mel_bins, audio.frames

    def sample(gen: torch.Generator, variant: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(2 + variant % 3, mels, frames, generator=gen),)

    clips = Dim("clips", min=1, max=max(64, limits.max_audio_clips * 16))
    return ExportRecipe(
        "audio_encoder", AudioEncoder(source.parts["audio_tower"], source.parts["audio_projector"]).eval(), [INPUT_FEATURES],
        [AUDIO_EMBEDS], {INPUT_FEATURES: {0: clips}}, sample,
    )


RECIPES = {"audio_encoder": audio_recipe, "llm": llm_recipe}
