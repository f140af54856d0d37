"""Mistral-3's export: the Pixtral vision tower + patch merger + projector on same-size image batches; the audio
tower (the tiny preset's tri-modal convention) is Voxtral's."""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim
from transformers import Mistral3ForConditionalGeneration

from builder.export.axes import COLS, ROWS
from builder.export.recipes import ExportRecipe, llm_recipe
from builder.families.base import SourceModel
from builder.families.voxtral.export import audio_recipe
from builder.runtime.contract import IMAGE_EMBEDS, PIXEL_VALUES
from builder.spec import LimitsSpec


class VisionEncoder(nn.Module):
    """pixel_values [images, 3, H, W] -> image_embeds [images, tokens_per_image, hidden].

    HF's Pixtral packs all images into one sequence with a block-diagonal mask and loops over
    ``image_sizes`` in Python, which does not export with a dynamic image count. Images of one
    size are independent, so running them as a batch computes exactly the same features.
    """

    def __init__(self, model: Mistral3ForConditionalGeneration) -> None:
        super().__init__()
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.feature_layer = model.config.vision_feature_layer
        self.merge = model.config.spatial_merge_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tower, projector = self.tower, self.projector
        patches = tower.patch_conv(pixel_values.to(tower.patch_conv.weight.dtype))  # [N, C, h, w]
        n, c, h, w = patches.shape
        embeds = tower.ln_pre(patches.flatten(2).transpose(1, 2))  # [N, h*w, C]
        # HF's 2-D positions (row, column) per patch; meshgrid keeps both sides symbolic in the export.
        rows, cols = torch.meshgrid(torch.arange(h, device=patches.device), torch.arange(w, device=patches.device),
                                    indexing="ij")
        position_ids = torch.stack([rows.flatten(), cols.flatten()], dim=-1)
        position_embeddings = tower.patch_positional_embedding(embeds, position_ids)
        hidden_states = [embeds]  # what HF's hidden_states holds: the input, then each layer's output
        for layer in tower.transformer.layers:
            hidden_states.append(layer(hidden_states[-1], None, position_embeddings=position_embeddings))
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else self.feature_layer
        features = projector.norm(torch.cat([hidden_states[i] for i in layers], dim=-1))
        # The patch merger's unfold over each image's [C, h, w] grid, for a batch of images.
        grid = features.transpose(1, 2).reshape(n, c, h, w)
        merged = nn.functional.unfold(grid, kernel_size=self.merge, stride=self.merge)  # [N, C*m*m, L]
        merged = projector.patch_merger.merging_layer(merged.transpose(1, 2))
        return projector.linear_2(projector.act(projector.linear_1(merged))).float()  # FP32 out, whatever the weights


def vision_recipe(source: SourceModel, limits: LimitsSpec) -> ExportRecipe:
    """Images of one size per call, any size in whole placeholder cells up to the longest edge."""
    image = source.facts.image
    assert image is not None
    cell, most = image.cell, -(-image.longest_edge // image.cell)
    shapes = [(2, 2, 3), (1, most, 1), (3, 1, most), (2, most, most)]  # (images, rows, cols): the export example first

    def sample(gen: torch.Generator, variant: int) -> tuple[torch.Tensor, ...]:
        count, rows, cols = shapes[variant % len(shapes)]
        return (torch.randn(count, 3, rows * cell, cols * cell, generator=gen),)

    images = Dim("images", min=1, max=max(64, limits.max_images * 16))
    rows, cols = Dim(ROWS, min=1, max=most), Dim(COLS, min=1, max=most)
    return ExportRecipe(
        "vision_encoder", VisionEncoder(source.model).eval(), [PIXEL_VALUES], [IMAGE_EMBEDS],
        {PIXEL_VALUES: {0: images, 2: cell * rows, 3: cell * cols}}, sample,
    )


RECIPES = {"vision_encoder": vision_recipe, "audio_encoder": audio_recipe, "llm": llm_recipe}
