"""Gemma 3's export: SigLIP + pooling projector on square images, and a decoder whose image tokens attend both ways."""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim
from transformers import DynamicCache

from builder.export.attention import GROUPED_ATTENTION, attention_implementation
from builder.export.recipes import ExportRecipe, llm_recipe
from builder.export.wrappers import LanguageModel
from builder.families.base import SourceModel
from builder.runtime.contract import IMAGE_EMBEDS, PIXEL_VALUES
from builder.spec import LimitsSpec


class FixedSizeVisionEncoder(nn.Module):
    """pixel_values [images, 3, size, size] -> [images, tokens_per_image, hidden]: the model's own
    ``get_image_features`` (Gemma 3: SigLIP, average pooling, projector), whose images all have one size."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.vision_tower.parameters()).dtype
        return self.model.get_image_features(pixel_values=pixel_values.to(dtype), return_dict=True).pooler_output.float()


class BidirectionalImageLanguageModel(LanguageModel):
    """Gemma 3's decoder: as :class:`LanguageModel`, but in a prefill the tokens of one image attend to each other
    both ways (HF builds that mask from ``token_type_ids`` on the first step), and sliding-window layers see only
    the last ``sliding_window`` positions. Both masks are built here, from ``multimodal_mask`` (a run of image
    tokens is one image) and the padding mask, and handed to the decoder per layer type. The cache keeps every
    position for every layer (the window is applied by the mask), which is what HF's cropped cache attends to.

    An image must lie whole in one call: serving prefills a prompt at once, and the prefix cache stops before the
    first image.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.sliding_window = self.config.sliding_window

    def attention_layout(self, num_layers: int) -> None:
        """An image's tokens attend to each other both ways: GroupQueryAttention's masks are causal."""
        return None

    def forward(
        self, input_ids: torch.Tensor, multimodal_embeds: torch.Tensor, multimodal_mask: torch.Tensor,
        attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        embeds = self.embed_tokens(input_ids)
        embeds = torch.where(multimodal_mask.unsqueeze(-1), multimodal_embeds.to(embeds.dtype), embeds)
        batch, seq = input_ids.shape
        past_length = past[0].shape[2]
        query = torch.arange(seq, device=input_ids.device) + past_length  # each query's position in the cache
        key = torch.arange(past_length + seq, device=input_ids.device)
        starts = multimodal_mask & ~torch.nn.functional.pad(multimodal_mask, (1, 0))[:, :-1]
        block = torch.where(multimodal_mask, torch.cumsum(starts.long(), dim=1) - 1, -1)  # k: the k-th image of the call
        key_block = torch.cat([torch.full((batch, past_length), -1, dtype=block.dtype, device=block.device), block], 1)
        same_image = (block[:, :, None] == key_block[:, None, :]) & (block[:, :, None] >= 0)
        full = ((key[None, None, :] <= query[None, :, None]) | same_image) & attention_mask[:, None, :].bool()
        sliding = full & (key[None, None, :] > query[None, :, None] - self.sliding_window)
        blocked = torch.finfo(embeds.dtype).min
        masks = {kind: torch.where(allowed, 0.0, blocked).to(embeds.dtype)[:, None]
                 for kind, allowed in (("full_attention", full), ("sliding_attention", sliding))}
        # Built from tensors, not the config: with the config the sliding layers would crop their cache.
        cache = DynamicCache(ddp_cache_data=[(past[2 * layer], past[2 * layer + 1]) for layer in range(self.num_layers)])
        with attention_implementation(self.config, GROUPED_ATTENTION):
            out = self.decoder(inputs_embeds=embeds, attention_mask=masks, position_ids=position_ids,
                               past_key_values=cache, use_cache=True, return_dict=True)
        logits = self.lm_head(out.last_hidden_state[:, -1, :]).float()
        present = []
        for layer in range(self.num_layers):
            present += [out.past_key_values.layers[layer].keys, out.past_key_values.layers[layer].values]
        return (logits, *present)


def fixed_size_vision_recipe(source: SourceModel, limits: LimitsSpec) -> ExportRecipe:
    """Images all resized to one square (Gemma 3): only their count varies."""
    image = source.facts.image
    assert image is not None
    side = image.longest_edge

    def sample(gen: torch.Generator, variant: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(1 + variant % 3, 3, side, side, generator=gen),)

    images = Dim("images", min=1, max=max(64, limits.max_images * 16))
    return ExportRecipe("vision_encoder", FixedSizeVisionEncoder(source.model).eval(), [PIXEL_VALUES], [IMAGE_EMBEDS],
                        {PIXEL_VALUES: {0: images}}, sample)



def bidirectional_llm_recipe(source: SourceModel, limits: LimitsSpec) -> ExportRecipe:
    return llm_recipe(source, limits, BidirectionalImageLanguageModel)


RECIPES = {"vision_encoder": fixed_size_vision_recipe, "llm": bidirectional_llm_recipe}
