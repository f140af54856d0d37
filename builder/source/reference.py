"""The correctness oracle: the source model in PyTorch, composed as the Hugging Face model composes it.

Image features from ``get_image_features``, audio features from Voxtral's tower + projector, both
``masked_scatter``-ed into the text embeddings at their placeholder tokens, then the model's own
``generate``. Used by the end-to-end tests and as the "Hugging Face eager" benchmark baseline.
"""

from __future__ import annotations

import numpy as np
import torch

from builder.source.audio_modules import audio_embeddings
from builder.source.checkpoint import SourceModel


def reference_embeddings(
    source: SourceModel, input_ids: np.ndarray, pixel_values: np.ndarray | None, input_features: np.ndarray | None
) -> torch.Tensor:
    model, tokens = source.model, source.facts.tokens
    ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))[None]
    embeds = model.get_input_embeddings()(ids)
    if pixel_values is not None and len(pixel_values):
        pixels = torch.from_numpy(pixel_values)
        sizes = torch.tensor([list(pixels.shape[-2:])] * pixels.shape[0])
        image = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes, return_dict=True).pooler_output
        embeds = embeds.masked_scatter((ids == tokens.image)[..., None], torch.cat(list(image)))
    if input_features is not None and len(input_features):
        assert source.audio_tower is not None and source.audio_projector is not None
        audio = audio_embeddings(source.audio_tower, source.audio_projector, torch.from_numpy(input_features))
        embeds = embeds.masked_scatter((ids == tokens.audio)[..., None], audio)
    return embeds


@torch.no_grad()
def reference_generate(
    source: SourceModel,
    input_ids: np.ndarray,
    pixel_values: np.ndarray | None = None,
    input_features: np.ndarray | None = None,
    max_new_tokens: int = 16,
) -> list[int]:
    """Greedy new tokens from the model's own ``generate``."""
    embeds = reference_embeddings(source, input_ids, pixel_values, input_features)
    out = source.model.generate(
        inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=source.facts.tokens.eos,
        pad_token_id=source.facts.tokens.eos,
    )
    return out[0].tolist()
