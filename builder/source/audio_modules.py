"""Voxtral's audio tower and projector, built from the ``audio_config`` of a Mistral-3 style config."""

from __future__ import annotations

import torch
from transformers import Mistral3Config, VoxtralConfig
from transformers.models.voxtral.modeling_voxtral import VoxtralEncoder, VoxtralMultiModalProjector


def voxtral_config(config: Mistral3Config) -> VoxtralConfig:
    return VoxtralConfig(
        audio_config=dict(config.audio_config),
        text_config=config.text_config.to_dict(),
        audio_token_id=config.audio_token_id,
        projector_hidden_act=config.projector_hidden_act,
    )


def build_audio_modules(config: Mistral3Config) -> tuple[VoxtralEncoder, VoxtralMultiModalProjector]:
    vconfig = voxtral_config(config)
    tower = VoxtralEncoder(vconfig.audio_config).eval()
    projector = VoxtralMultiModalProjector(vconfig).eval()
    return tower, projector


def audio_embeddings(
    tower: VoxtralEncoder, projector: VoxtralMultiModalProjector, input_features: torch.Tensor
) -> torch.Tensor:
    """[clips, mels, frames] -> [clips * tokens_per_clip, hidden]: what ``VoxtralModel.get_audio_features`` does."""
    hidden = tower(input_features, return_dict=True).last_hidden_state
    hidden = hidden.reshape(-1, tower.config.intermediate_size)
    return projector(hidden)
