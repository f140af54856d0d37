"""The decoder's flat-I/O wrapper that every family's LLM graph starts from (a family's own wrappers live in its
package, ``builder/families/<model_type>/export.py``).

It reuses the checkpoint's own modules, so the exported graph computes what the source model computes;
:mod:`builder.export.parity` proves it on fresh inputs.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, Mistral3ForConditionalGeneration

from builder.export.attention import GROUPED_ATTENTION, attention_implementation
from builder.export.graph import AttentionLayout


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

    def attention_layout(self, num_layers: int) -> AttentionLayout | None:
        """Causal attention over the cache in every layer, through the window when the config slides (as
        :meth:`forward` masks it); a wrapper that attends otherwise says None."""
        config = self.config
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        window = int(getattr(config, "sliding_window", None) or 0)
        return AttentionLayout(heads, int(config.num_key_value_heads), head_dim, (window,) * num_layers)

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
        window = getattr(self.config, "sliding_window", None)
        if window is None:
            cache = DynamicCache(config=self.config)
            for layer in range(self.num_layers):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
        else:
            # Every layer slides (Mistral's sliding_window): the window is applied by a mask built here, over a cache
            # that keeps every position; with the config the cache would crop each past to the window, and the
            # present would no longer be past + new, which is what serving appends.
            cache = DynamicCache(ddp_cache_data=[(past[2 * layer], past[2 * layer + 1]) for layer in range(self.num_layers)])
            attention_mask = sliding_window_mask(attention_mask, input_ids.shape[1], window, embeds.dtype)
        with attention_implementation(self.config, GROUPED_ATTENTION):
            out = self.decoder(
                inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, return_dict=True,
            )
        logits = self.lm_head(out.last_hidden_state[:, -1, :]).float()  # the KV cache alone is in the weights' dtype
        present = []
        for layer in range(self.num_layers):
            present += [out.past_key_values.layers[layer].keys, out.past_key_values.layers[layer].values]
        return (logits, *present)


def sliding_window_mask(attention_mask: torch.Tensor, seq: int, window: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask [B, 1, S, past + S] of causal attention over the last ``window`` positions (HF's sliding
    window: a query sees a key at most ``window - 1`` positions back), padding (``attention_mask`` 0) blocked."""
    total = attention_mask.shape[1]
    query = torch.arange(seq, device=attention_mask.device) + (total - seq)  # each query's position in the cache
    key = torch.arange(total, device=attention_mask.device)
    allowed = ((key[None, :] <= query[:, None]) & (key[None, :] > query[:, None] - window))[None] & attention_mask[:, None, :].bool()
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]
