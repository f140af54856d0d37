"""What a component's ONNX graph is (:class:`ExportRecipe`), and the LLM's recipe every family shares.

A family's encoder recipes live in its package (``builder/families/<model_type>/export.py``, table ``RECIPES``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.export import Dim

from builder.components import LLM
from builder.export.wrappers import LanguageModel
from builder.families.base import SourceModel
from builder.runtime.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    MULTIMODAL_EMBEDS,
    MULTIMODAL_MASK,
    PAST_PREFIX,
    POSITION_IDS,
    PRESENT_PREFIX,
)
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
        INPUT_IDS: {0: batch, 1: seq},
        MULTIMODAL_EMBEDS: {0: batch, 1: seq},
        MULTIMODAL_MASK: {0: batch, 1: seq},
        ATTENTION_MASK: {0: batch, 1: total},  # must be fully dynamic: past + sequence
        POSITION_IDS: {0: batch, 1: seq} if facts.position_rows == 1 else {1: batch, 2: seq},
        "past": tuple({0: batch, 2: past} for _ in range(2 * layers)),
    }
    inputs = [INPUT_IDS, MULTIMODAL_EMBEDS, MULTIMODAL_MASK, ATTENTION_MASK, POSITION_IDS]
    return ExportRecipe(
        LLM.name, module, inputs + kv_names(PAST_PREFIX, layers),
        [LOGITS] + kv_names(PRESENT_PREFIX, layers), dynamic, sample,
    )
