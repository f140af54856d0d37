"""Compares an exported ONNX graph with its PyTorch module on fresh random inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from builder.compare import cosine
from builder.errors import BuildError
from builder.export.graph import ParityResult
from builder.export.recipes import ExportRecipe


def check_parity(recipe: ExportRecipe, onnx_path: Path, samples: int, atol: float, rtol: float, seed: int = 1234,
                 cosine_gate: float | None = None) -> ParityResult:
    """Raises ``BuildError`` naming the output and the error if any output is outside tolerance.

    Inputs come from a generator seeded differently from the export example, and vary the
    dynamic axes (batch, sequence, past length), so a graph that baked in a shape fails here.
    ``cosine_gate`` (FP16 graphs) judges each output by its cosine with PyTorch's instead: ONNX
    Runtime and PyTorch round FP16 at different points, so elementwise tolerances say little.
    """
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    worst_err, worst_cos = 0.0, 1.0
    for variant in range(1, samples + 1):
        inputs = recipe.sample_inputs(gen, variant)
        with torch.no_grad():
            expected = recipe.module(*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        feeds = {name: tensor.numpy() for name, tensor in zip(recipe.input_names, inputs)}
        actual = session.run(recipe.output_names, feeds)
        for name, got, want in zip(recipe.output_names, actual, expected):
            want = want.numpy()
            if got.shape != want.shape:
                raise BuildError(f"{recipe.component}: ONNX output {name} has shape {got.shape}, PyTorch {want.shape}")
            err = float(np.max(np.abs(got.astype(np.float64) - want))) if got.size else 0.0
            similarity = cosine(got, want)
            if cosine_gate is not None and similarity < cosine_gate:
                raise BuildError(f"{recipe.component}: ONNX output {name} differs from PyTorch (cos {similarity:.6f} < {cosine_gate})")
            if cosine_gate is None and not np.allclose(got, want, atol=atol, rtol=rtol):
                raise BuildError(
                    f"{recipe.component}: ONNX output {name} differs from PyTorch (max |err| {err:.3g} > atol {atol} + rtol {rtol})"
                )
            worst_err, worst_cos = max(worst_err, err), min(worst_cos, similarity)
    if cosine_gate is not None:
        return ParityResult(samples, worst_err, worst_cos, None, None, cosine_gate, "float16")
    return ParityResult(samples, worst_err, worst_cos, atol, rtol)
