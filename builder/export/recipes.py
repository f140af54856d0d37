"""What each component's ONNX graph is: module, tensor names, dynamic axes and sample inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.export import Dim

from builder.export.axes import COLS, ROWS
from builder.export.wrappers import (AudioEncoder, ChunkedAudioEncoder, FixedSizeVisionEncoder, LanguageModel,
                                     MaskedAudioEncoder, VisionEncoder, WindowedVisionEncoder)
from builder.families.base import SourceModel
from builder.spec import LimitsSpec

Sampler = Callable[[torch.Generator, int], tuple[torch.Tensor, ...]]


@dataclass
class ExportRecipe:
    component: str  # vision_encoder | audio_encoder | llm
    module: torch.nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: dict[str, Any]
    sample_inputs: Sampler  # (generator, variant) -> inputs; variant 0 is the export example


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
        "vision_encoder", VisionEncoder(source.model).eval(), ["pixel_values"], ["image_embeds"],
        {"pixel_values": {0: images, 2: cell * rows, 3: cell * cols}}, sample,
    )


def fixed_size_vision_recipe(source: SourceModel, limits: LimitsSpec) -> ExportRecipe:
    """Images all resized to one square (Gemma 3): only their count varies."""
    image = source.facts.image
    assert image is not None
    side = image.longest_edge

    def sample(gen: torch.Generator, variant: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(1 + variant % 3, 3, side, side, generator=gen),)

    images = Dim("images", min=1, max=max(64, limits.max_images * 16))
    return ExportRecipe("vision_encoder", FixedSizeVisionEncoder(source.model).eval(), ["pixel_values"], ["image_embeds"],
                        {"pixel_values": {0: images}}, sample)


def audio_recipe(source: SourceModel, limits: LimitsSpec) -> ExportRecipe:
    audio = source.facts.audio
    assert audio is not None
    mels, frames = audio.num_mel_bins, audio.frames

    def sample(gen: torch.Generator, variant: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(2 + variant % 3, mels, frames, generator=gen),)

    clips = Dim("clips", min=1, max=max(64, limits.max_audio_clips * 16))
    return ExportRecipe(
        "audio_encoder", AudioEncoder(source.parts["audio_tower"], source.parts["audio_projector"]).eval(), ["input_features"],
        ["audio_embeds"], {"input_features": {0: clips}}, sample,
    )


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
        "audio_encoder", module, ["input_features", "feature_attention_mask"], ["audio_embeds"],
        {"input_features": {0: clips}, "feature_attention_mask": {0: clips}}, sample,
    )


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
    return ExportRecipe("vision_encoder", WindowedVisionEncoder(source.model).eval(), names, ["image_embeds"], dynamic, sample)


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
    return ExportRecipe("audio_encoder", ChunkedAudioEncoder(source.model).eval(), names, ["audio_embeds"], dynamic, sample)


def kv_names(prefix: str, num_layers: int) -> list[str]:
    return [f"{prefix}.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


def llm_recipe(source: SourceModel, limits: LimitsSpec, wrapper: type[LanguageModel] = LanguageModel) -> ExportRecipe:
    """``wrapper``: the decoder's flat-I/O module (a family whose attention is not plain causal has its own)."""
    facts = source.facts
    layers = facts.num_layers
    module = wrapper(source.model).eval()

    def sample(gen: torch.Generator, variant: int) -> tuple[torch.Tensor, ...]:
        # variant 0: a batch-2 prefill after a short past; others alternate prefill and decode shapes.
        batch, seq, past = [(2, 5, 3), (1, 9, 0), (3, 1, 7)][variant % 3]
        ids = torch.randint(0, facts.vocab_size, (batch, seq), generator=gen)
        embeds = torch.randn(batch, seq, facts.hidden_size, generator=gen)
        mask = torch.rand(batch, seq, generator=gen) > 0.5
        attention = torch.ones(batch, past + seq, dtype=torch.long)
        positions = torch.arange(past, past + seq).unsqueeze(0).repeat(batch, 1)
        if facts.position_rows != 1:  # M-RoPE: [rows, B, S]
            positions = positions.unsqueeze(0).repeat(facts.position_rows, 1, 1)
        kv_dtype = module.lm_head.weight.dtype  # at call time: the export casts the weights first
        cache = [torch.randn(batch, facts.num_kv_heads, past, facts.head_dim, generator=gen).to(kv_dtype)
                 for _ in range(2 * layers)]
        return (ids, embeds, mask, attention, positions, *cache)

    batch = Dim("batch", min=1, max=256)
    seq = Dim("sequence", min=1, max=limits.max_context)
    past = Dim("past", min=0, max=limits.max_context)
    total = Dim("total", min=1, max=2 * limits.max_context)
    dynamic = {
        "input_ids": {0: batch, 1: seq},
        "multimodal_embeds": {0: batch, 1: seq},
        "multimodal_mask": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},  # must be fully dynamic: past + sequence
        "position_ids": {0: batch, 1: seq} if facts.position_rows == 1 else {1: batch, 2: seq},
        "past": tuple({0: batch, 2: past} for _ in range(2 * layers)),
    }
    inputs = ["input_ids", "multimodal_embeds", "multimodal_mask", "attention_mask", "position_ids"]
    return ExportRecipe(
        "llm", module, inputs + kv_names("past_key_values", layers),
        ["logits"] + kv_names("present", layers), dynamic, sample,
    )
