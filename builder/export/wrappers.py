"""Small ``nn.Module`` wrappers with flat tensor I/O around the Hugging Face submodules.

Each reuses the checkpoint's own modules, so the exported graph computes what the source model
computes; :mod:`builder.export.parity` proves it on fresh inputs.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache, Mistral3ForConditionalGeneration
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from builder.families.voxtral import audio_embeddings


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


class FixedSizeVisionEncoder(nn.Module):
    """pixel_values [images, 3, size, size] -> [images, tokens_per_image, hidden]: the model's own
    ``get_image_features`` (Gemma 3: SigLIP, average pooling, projector), whose images all have one size."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.vision_tower.parameters()).dtype
        return self.model.get_image_features(pixel_values=pixel_values.to(dtype), return_dict=True).pooler_output.float()


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


class LanguageModel(nn.Module):
    """One graph for prefill and decode, KV cache as flat ``past_key_values.{i}.key/value`` tensors.

    Text embeddings are looked up inside the graph; ``multimodal_embeds`` replaces them where
    ``multimodal_mask`` is set (the placeholder positions), which is the model's own
    ``masked_scatter``. Only the last position's logits are returned: that is all decoding needs.
    """

    def __init__(self, model: Mistral3ForConditionalGeneration) -> None:
        super().__init__()
        self.embed_tokens = model.get_input_embeddings()
        self.decoder = model.model.language_model
        self.lm_head = model.lm_head
        self.config = model.config.text_config
        self.num_layers = self.config.num_hidden_layers

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S] int64
        multimodal_embeds: torch.Tensor,  # [B, S, hidden]
        multimodal_mask: torch.Tensor,  # [B, S] bool
        attention_mask: torch.Tensor,  # [B, past + S] int64
        position_ids: torch.Tensor,  # [B, S] int64
        *past: torch.Tensor,  # key_0, value_0, key_1, ... each [B, kv_heads, past, head_dim]
    ) -> tuple[torch.Tensor, ...]:
        embeds = self.embed_tokens(input_ids)
        embeds = torch.where(multimodal_mask.unsqueeze(-1), multimodal_embeds.to(embeds.dtype), embeds)
        cache = DynamicCache(config=self.config)
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        with _attention(self.config, GROUPED_ATTENTION):
            out = self.decoder(
                inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, return_dict=True,
            )
        logits = self.lm_head(out.last_hidden_state[:, -1, :]).float()  # the KV cache alone is in the weights' dtype
        present = []
        for layer in range(self.num_layers):
            present += [out.past_key_values.layers[layer].keys, out.past_key_values.layers[layer].values]
        return (logits, *present)


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
        with _attention(self.config, GROUPED_ATTENTION):
            out = self.decoder(inputs_embeds=embeds, attention_mask=masks, position_ids=position_ids,
                               past_key_values=cache, use_cache=True, return_dict=True)
        logits = self.lm_head(out.last_hidden_state[:, -1, :]).float()
        present = []
        for layer in range(self.num_layers):
            present += [out.past_key_values.layers[layer].keys, out.past_key_values.layers[layer].values]
        return (logits, *present)


GROUPED_ATTENTION = "grouped_query_matmul"


def grouped_query_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, softcap=None, **kwargs):
    """HF's eager attention for a decoder whose query heads share key/value heads, without ``repeat_kv``: query
    [B, heads, S, d] is viewed as [B, kv_heads, groups * S, d] against the cache's own [B, kv_heads, L, d]. Exported,
    sdpa copies every cached key and value ``groups`` times (Expand) and transposes the keys apart from the MatMul
    (its scale sits between them): at batch 8 that was a third of a CPU decode step. Here the Transpose feeds the
    MatMul directly (ONNX Runtime fuses the two) and the scale follows it. Masks are HF's additive float masks."""
    assert softcap is None, "logit soft-capping is not exported"
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads  # head h reads kv head h // groups, as repeat_kv lays them out
    scores = torch.matmul(query.reshape(batch, kv_heads, groups * length, dim), key.transpose(2, 3)) * scaling
    if attention_mask is not None:  # [B, 1, S, L] -> [B, 1, 1, S, L]: one mask for every head
        scores = (scores.reshape(batch, kv_heads, groups, length, -1) + attention_mask[:, :, None]
                  ).reshape(batch, kv_heads, groups * length, -1)
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).reshape(batch, heads, length, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_ATTENTION, grouped_query_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_ATTENTION, eager_mask)


# The name must hold "flash": only then do Qwen2.5-Omni's encoders hand their segment bounds (cu_seqlens) to the
# attention function instead of splitting the batch with a Python loop over them, which does not export.
SEGMENT_ATTENTION = "flash_segments_as_tensors"


def _block_diagonal_attention(query, key, value, scaling, bounds):
    """query/key/value [1, heads, S, d], attention only inside [bounds[i], bounds[i + 1]): [1, S, heads, d]."""
    position = torch.arange(query.shape[2], device=query.device)
    # bounds[1:], never empty (bounds[1:-1] is empty for one segment, which ONNX Runtime then mis-broadcasts)
    segment = (position[:, None] >= bounds[1:].to(position.dtype)[None, :]).sum(-1)
    mask = segment[:, None] == segment[None, :]
    out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask[None, None], scale=scaling)
    return out.transpose(1, 2).contiguous()


def segment_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, is_causal=False,
                      cu_seq_lens_q=None, cu_seq_lens_k=None, **kwargs):
    """HF's varlen attention (each segment of ``cu_seq_lens_q`` attends to itself) in tensor ops. A module tagged
    with ``max_segment_len`` (a static bound on its segments: audio chunks, vision windows) gathers its segments into
    a padded [segments, L] batch (memory O(S * L)); an untagged one uses a block-diagonal [S, S] mask."""
    longest = getattr(module, "max_segment_len", None)
    if longest is None:
        return _block_diagonal_attention(query, key, value, scaling, cu_seq_lens_q), None
    bounds = cu_seq_lens_q.long()
    starts, ends = bounds[:-1], bounds[1:]
    index = starts[:, None] + torch.arange(longest, device=query.device)[None, :]  # [segments, L]
    valid = index < ends[:, None]
    index = torch.where(valid, index, torch.zeros_like(index))
    q, k, v = (t[0][:, index].transpose(0, 1) for t in (query, key, value))  # [segments, heads, L, d]
    out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=scaling)
    position = torch.arange(query.shape[2], device=query.device)
    segment = (position[:, None] >= ends[None, :]).sum(-1)
    flat = segment * longest + (position - starts[segment])
    return out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3])[flat][None], None


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)


@contextmanager
def _attention(config, implementation: str):
    """``config``'s attention implementation switched for the call (the source model keeps its own)."""
    kept = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = kept


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
        with _attention(self.tower.config, SEGMENT_ATTENTION):
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
        with _attention(self.visual.config, SEGMENT_ATTENTION):
            out = self.visual(pixel_patches.to(dtype), grid_thw=None, position_ids=rotary_pos_ids, cu_seqlens=cu_seqlens,
                              window_index=window_index, cu_window_seqlens=cu_window_seqlens, max_seqlen=0,
                              max_window_seqlen=0, return_dict=True)
        return out.pooler_output.float()
