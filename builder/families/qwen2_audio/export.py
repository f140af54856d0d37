"""Qwen2-Audio's export: the audio tower masking each clip's padding, then the projector."""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from builder.export.recipes import ExportRecipe, llm_recipe
from builder.families.base import SourceModel
from builder.runtime.contract import AUDIO_EMBEDS, FEATURE_ATTENTION_MASK, INPUT_FEATURES
from builder.spec import LimitsSpec


class MaskedAudioEncoder(nn.Module):
    """input_features [clips, mels, frames] + feature_attention_mask [clips, frames] -> [clips, tokens, hidden].

    Qwen2-Audio's composition (``Qwen2AudioForConditionalGeneration.forward``): the tower attends only to the
    encoder positions a clip's mask covers, and its pooled positions go through the projector; the caller keeps
    each clip's first ``clip_tokens(frames)`` tokens.
    """

    def __init__(self, tower: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.projector = projector

    def forward(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> torch.Tensor:
        dtype = next(self.tower.parameters()).dtype
        positions = (feature_attention_mask.sum(-1) - 1) // 2 + 1  # after the stride-2 convolution
        attended = torch.arange((input_features.shape[-1] - 1) // 2 + 1, device=input_features.device)[None, :] \
            < positions[:, None]
        mask = torch.zeros(attended.shape, dtype=dtype).masked_fill(~attended, torch.finfo(dtype).min)[:, None, None, :]
        hidden = self.tower(input_features.to(dtype), attention_mask=mask).last_hidden_state
        return self.projector(hidden).float()


def masked_audio_recipe(source: SourceModel, limits: LimitsSpec) -> ExportRecipe:
    """An audio tower that masks each clip's padding: features and ``feature_attention_mask``, both by clip."""
    audio = source.facts.audio
    assert audio is not None
    mels, frames = audio.num_mel_bins, audio.frames

    def sample(gen: torch.Generator, variant: int) -> tuple[torch.Tensor, ...]:
        clips = 2 + variant % 3
        lengths = torch.randint(3, frames + 1, (clips,), generator=gen)
        lengths[0] = frames  # one whole window
        mask = (torch.arange(frames)[None, :] < lengths[:, None]).long()
        return torch.randn(clips, mels, frames, generator=gen), mask

    clips = Dim("clips", min=1, max=max(64, limits.max_audio_clips * 16))
    module = MaskedAudioEncoder(source.parts["audio_tower"], source.parts["audio_projector"]).eval()
    return ExportRecipe(
        "audio_encoder", module, [INPUT_FEATURES, FEATURE_ATTENTION_MASK], [AUDIO_EMBEDS],
        {INPUT_FEATURES: {0: clips}, FEATURE_ATTENTION_MASK: {0: clips}}, sample,
    )


RECIPES = {"audio_encoder": masked_audio_recipe, "llm": llm_recipe}
