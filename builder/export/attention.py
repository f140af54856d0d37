"""Attention implementations registered with transformers for the exported graphs, and a switch to use one.

- ``GROUPED_ATTENTION``: a decoder's grouped-query attention without ``repeat_kv`` (every family's LLM).
- ``SEGMENT_ATTENTION``: varlen attention (each segment attends to itself) in tensor ops, for encoders that take
  their segment bounds as tensors (Qwen-VL vision windows, Qwen2.5-Omni audio chunks).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

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
def attention_implementation(config, implementation: str):
    """``config``'s attention implementation switched for the call (the source model keeps its own)."""
    kept = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = kept
