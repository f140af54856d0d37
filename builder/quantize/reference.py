"""The gates' reference for a quantized LLM: the checkpoint's own model in PyTorch, never an FP32 graph (a 24B
model's is 96 GB, and ONNX Runtime would hold it whole).

The model is loaded with its decoder's weights left in the shards (:func:`builder.families.shards.load_layers_on_demand`):
a forward holds the encoders and one decoder layer, or the embedding table, or the lm_head, widened to FP32 as it is
read, so the reference computes in FP32 whatever dtype the checkpoint stores. It runs the recipe's own LLM module (the graph's inputs, the family's
masks and positions), so it computes what the graph is meant to compute.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from builder.components import LLM
from builder.export.wrappers import LanguageModel
from builder.quantize.agreement import FusedPrompt
from builder.runtime.model_facts import ModelFacts
from builder.source.checkpoint import check_checkpoint
from builder.spec import LimitsSpec


class TorchScorer:
    """A :class:`~builder.quantize.agreement.LogitScorer` over the PyTorch model: the prompt and its continuation in
    one forward pass (each layer read once), the logits of the positions the gates compare."""

    def __init__(self, module: LanguageModel, facts: ModelFacts, weight_names: dict[int, str]) -> None:
        self.module, self.facts = module, facts
        self.weight_names = weight_names  # id of each Linear -> the HF model's name of its weight

    @classmethod
    def load(cls, checkpoint: Path, tokenizer: Path, limits: LimitsSpec) -> "TorchScorer":
        """``tokenizer``: the ``tokenizer.json`` the build serves (the facts read it)."""
        found = check_checkpoint(checkpoint)
        source = found.load("float32", tokenizer, layers_on_demand=True)
        (recipe,) = found.family.recipes(source, limits, [LLM.name])
        names = {id(m): f"{name}.weight" for name, m in source.model.named_modules() if isinstance(m, nn.Linear)}
        return cls(recipe.module, source.facts, names)  # the encoders' modules go with ``source``

    def score(self, prompt: FusedPrompt, continuation: np.ndarray) -> np.ndarray:
        facts, length = self.facts, prompt.input_ids.size
        total = length + continuation.size
        rows = facts.position_rows
        prompt_positions = (prompt.position_ids if prompt.position_ids is not None
                            else np.broadcast_to(np.arange(length), (rows, length)))
        # As serving decodes: each new token's position follows the prompt's largest (M-RoPE: images span fewer).
        after = int(prompt_positions.max()) + 1 if length else 0
        positions = np.concatenate([prompt_positions, np.broadcast_to(np.arange(after, after + continuation.size),
                                                                      (rows, continuation.size))], axis=1)
        position_ids = torch.from_numpy(positions.astype(np.int64))[:, None]  # [rows, 1, total]
        embeds = torch.zeros(1, total, facts.hidden_size)
        embeds[0, :length] = torch.from_numpy(prompt.embeds)
        mask = torch.zeros(1, total, dtype=torch.bool)
        mask[0, :length] = torch.from_numpy(prompt.mask)
        ids = torch.from_numpy(np.concatenate([prompt.input_ids, continuation]).astype(np.int64))[None]
        dtype = self.module.lm_head.weight.dtype
        past = [torch.zeros(1, facts.num_kv_heads, 0, facts.head_dim, dtype=dtype)] * (2 * facts.num_layers)
        hidden: list[torch.Tensor] = []  # the decoder's output at every position: the wrapper keeps only the last
        hook = self.module.decoder.register_forward_hook(lambda _m, _a, out: hidden.append(out.last_hidden_state))
        try:
            with torch.no_grad():
                self.module(ids, embeds, mask, torch.ones(1, total, dtype=torch.long),
                            position_ids[0] if rows == 1 else position_ids, *past)
                return self.module.lm_head(hidden[0][0, length - 1:]).float().numpy()
        finally:
            hook.remove()
