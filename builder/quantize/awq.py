"""Activation-aware scales for 4-bit weights (AWQ, Lin et al. 2023), searched layer by layer on the calibration
prompts: the LLM's calibrated 4-bit rung, for when round to nearest fails the gate.

A few input channels of a Linear carry most of its activation magnitude; rounding their weights costs the most.
Scaling those weight columns up by ``s`` before rounding (and the activations down by ``s``, a Mul before the
MatMul: the product is unchanged) gives them finer steps. Per Linear, ``s = mean|x| ** alpha`` (normalized), with
``alpha`` the grid point whose rounded weights reproduce the Linear's outputs on the calibration activations best.

The search runs inside the checkpoint's own PyTorch forward (:mod:`builder.quantize.reference`'s load: each decoder
layer read from the shards while it runs), in each Linear's forward-pre-hook, where its weights and its real inputs
are both at hand: one forward over the calibration prompts reads each layer once. The lm_head is not scaled.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from builder.quantize.agreement import FusedPrompt
from builder.quantize.reference import TorchScorer

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # alpha 0: no scaling, plain round to nearest
SEARCH_ROWS = 256  # calibration activations per Linear the search multiplies (evenly spaced)


def search_scales(scorer: TorchScorer, prompts: Sequence[FusedPrompt], bits: int, block_size: int, output: Path) -> Path:
    """Each decoder Linear's scales ``s`` [K] by the HF name of its weight, in ``output`` (.npz). ``prompts``: the
    calibration prompts (never held-out ones), run as one sequence so each layer is read once."""
    found: dict[str, np.ndarray] = {}

    def search(linear: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        found[scorer.weight_names[id(linear)]] = best_scales(linear.weight, args[0], bits, block_size)

    linears = [m for layer in scorer.module.decoder.layers for m in layer.modules() if isinstance(m, nn.Linear)]
    hooks = [linear.register_forward_pre_hook(search) for linear in linears]
    try:
        joined = FusedPrompt(np.concatenate([p.input_ids for p in prompts]), np.concatenate([p.embeds for p in prompts]),
                             np.concatenate([p.mask for p in prompts]))
        scorer.score(joined, np.zeros(0, np.int64))
    finally:
        for hook in hooks:
            hook.remove()
    np.savez(output, **found)
    return output


def best_scales(weight: torch.Tensor, inputs: torch.Tensor, bits: int, block_size: int) -> np.ndarray:
    """``weight`` [N, K] (a Linear's), ``inputs`` [..., K]: the scales of the grid point with the least output error."""
    with torch.no_grad():
        rows = inputs.reshape(-1, inputs.shape[-1]).float()
        rows = rows[torch.linspace(0, rows.shape[0] - 1, min(SEARCH_ROWS, rows.shape[0])).long()]
        w = weight.float()
        want = rows @ w.T
        magnitude = rows.abs().mean(dim=0).clamp(min=1e-6)
        best, best_error = torch.ones_like(magnitude), float("inf")
        for alpha in GRID:
            scales = magnitude.pow(alpha)
            scales = scales / (scales.max() * scales.min()).sqrt()  # centred, so neither side of the Mul overflows
            error = float(((rows / scales) @ rounded(w * scales, bits, block_size).T - want).pow(2).mean())
            if error < best_error:
                best, best_error = scales, error
        return best.numpy().astype(np.float32)


def rounded(weight: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """``weight`` [N, K] rounded to nearest in symmetric blocks of ``block_size`` along K (MatMulNBits' layout)."""
    columns, depth = weight.shape
    padded = torch.nn.functional.pad(weight, (0, -depth % block_size))
    blocks = padded.reshape(columns, -1, block_size)
    most = 2 ** (bits - 1) - 1
    scale = blocks.abs().amax(dim=2, keepdim=True).clamp(min=1e-12) / most
    return (torch.clamp(torch.round(blocks / scale), -most - 1, most) * scale).reshape(columns, -1)[:, :depth]
