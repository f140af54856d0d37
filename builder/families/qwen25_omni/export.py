"""Qwen2.5-Omni thinker's export: Qwen2.5-VL's windowed vision tower and the chunked audio tower, each on index
tensors that serving computes in numpy (``runtime.encoders``), so neither graph holds a Python loop."""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from builder.export.attention import SEGMENT_ATTENTION, attention_implementation
from builder.export.recipes import ExportRecipe, llm_recipe
from builder.families.base import SourceModel
from builder.runtime.contract import AUDIO_EMBEDS, IMAGE_EMBEDS
from builder.spec import LimitsSpec


class ChunkedAudioEncoder(nn.Module):
    """Qwen2.5-Omni's audio tower on index tensors computed in numpy (``runtime.media.chunked.ChunkedLayout.graph_feeds``):
    padded_feature [chunks, mels, frames] + chunk_lengths + valid_indices + pool_indices + cu_seqlens ->
    audio_embeds [tokens of all clips, hidden]. The tower takes them in place of its Python loops."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.tower = model.model.audio_tower
        for layer in self.tower.layers:  # a chunk is at most 2 * n_window mel frames: n_window after the convolution
            layer.self_attn.max_segment_len = self.tower.config.n_window

    def forward(self, padded_feature, chunk_lengths, valid_indices, pool_indices, cu_seqlens) -> torch.Tensor:
        dtype = next(self.tower.parameters()).dtype
        with attention_implementation(self.tower.config, SEGMENT_ATTENTION):
            out = self.tower(input_features=None, feature_lens=None, padded_feature=padded_feature.to(dtype),
                             chunk_lengths=chunk_lengths, valid_indices=valid_indices, pool_indices=pool_indices,
                             cu_seqlens=cu_seqlens, max_seqlen=0, return_dict=True)
        return out.last_hidden_state.float()


class WindowedVisionEncoder(nn.Module):
    """Qwen2.5-Omni's (Qwen2.5-VL's) vision tower on index tensors computed in numpy
    (``runtime.media.qwen_vl.QwenVLLayout.graph_feeds``): pixel_patches [patches, C*T*p*p] + rotary_pos_ids + window_index +
    cu_seqlens + cu_window_seqlens -> image_embeds [merged tokens, hidden], image after image, row-major."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.visual = model.model.visual
        config = self.visual.config
        for i, block in enumerate(self.visual.blocks):  # window blocks: at most (window / patch)^2 patches
            if i not in config.fullatt_block_indexes:
                block.attn.max_segment_len = (config.window_size // config.patch_size) ** 2

    def forward(self, pixel_patches, rotary_pos_ids, window_index, cu_seqlens, cu_window_seqlens) -> torch.Tensor:
        dtype = next(self.visual.parameters()).dtype
        with attention_implementation(self.visual.config, SEGMENT_ATTENTION):
            out = self.visual(pixel_patches.to(dtype), grid_thw=None, position_ids=rotary_pos_ids, cu_seqlens=cu_seqlens,
                              window_index=window_index, cu_window_seqlens=cu_window_seqlens, max_seqlen=0,
                              max_window_seqlen=0, return_dict=True)
        return out.pooler_output.float()


def windowed_vision_recipe(source: SourceModel, limits: LimitsSpec) -> ExportRecipe:
    """Qwen2-VL-style images (any size in whole cells) as patches and numpy index tensors, same-size images per call."""
    import numpy as np

    from builder.runtime.media import image_layout

    image = source.facts.image
    assert image is not None
    layout = image_layout(image)
    names = ["pixel_patches", "rotary_pos_ids", "window_index", "cu_seqlens", "cu_window_seqlens"]
    shapes = [(2, 4, 6), (1, 9, 5), (3, 2, 2), (1, 12, 16)]  # (images, rows, cols) of cells: the export example first

    def sample(gen: torch.Generator, variant: int) -> tuple[torch.Tensor, ...]:
        count, rows, cols = shapes[variant % len(shapes)]
        pixels = torch.randn(count, 3, rows * image.cell, cols * image.cell, generator=gen).numpy()
        feeds = layout.graph_feeds(pixels)
        return tuple(torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in names)

    merged = Dim("merged_tokens", min=1, max=max(65536, image.max_pixels // image.cell ** 2 * 16))
    images, windows = Dim("images_plus_one", min=2, max=1025), Dim("windows_plus_one", min=2, max=65537)
    dynamic = {"pixel_patches": {0: 4 * merged}, "rotary_pos_ids": {0: 4 * merged}, "window_index": {0: merged},
               "cu_seqlens": {0: images}, "cu_window_seqlens": {0: windows}}
    assert image.merge_size == 2, "the export's patch axis is 4 x merged tokens"
    return ExportRecipe("vision_encoder", WindowedVisionEncoder(source.model).eval(), names, [IMAGE_EMBEDS], dynamic, sample)


def chunked_audio_recipe(source: SourceModel, limits: LimitsSpec) -> ExportRecipe:
    """Clips of any length as chunks of ``chunk_frames`` mel frames and numpy index tensors, all clips in one call."""
    import numpy as np

    from builder.runtime.media import audio_layout

    audio = source.facts.audio
    assert audio is not None
    layout = audio_layout(audio)
    names = ["padded_feature", "chunk_lengths", "valid_indices", "pool_indices", "cu_seqlens"]
    lengths = [(237, 461), (100,), (701, 50, 301), (2990,)]  # mel frames per clip: the export example first

    def sample(gen: torch.Generator, variant: int) -> tuple[torch.Tensor, ...]:
        frames = np.array(lengths[variant % len(lengths)], np.int64)
        features = torch.randn(len(frames), audio.num_mel_bins, int(frames.max()), generator=gen).numpy()
        feeds = layout.graph_feeds(features, frames)
        return tuple(torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in names)

    chunks = Dim("chunks", min=1, max=4096)
    dynamic = {"padded_feature": {0: chunks, 2: Dim("chunk_frames", min=2, max=audio.chunk_frames)},
               "chunk_lengths": {0: chunks}, "valid_indices": {0: Dim("convolved", min=1, max=400000)},
               "pool_indices": {0: Dim("audio_tokens", min=1, max=200000)},
               "cu_seqlens": {0: Dim("chunks_plus_one", min=2, max=4097)}}
    return ExportRecipe("audio_encoder", ChunkedAudioEncoder(source.model).eval(), names, [AUDIO_EMBEDS], dynamic, sample)


RECIPES = {"vision_encoder": windowed_vision_recipe, "audio_encoder": chunked_audio_recipe, "llm": llm_recipe}
