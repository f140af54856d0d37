"""Compares an exported ONNX graph with its PyTorch module on fresh random inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from builder.compare import figures, run_onnxruntime
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
    gen = torch.Generator().manual_seed(seed)
    names = recipe.output_names
    feeds, expected = [], []
    for variant in range(1, samples + 1):
        inputs = recipe.sample_inputs(gen, variant)
        with torch.no_grad():
            outputs = recipe.module(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        expected.append({name: tensor.numpy() for name, tensor in zip(names, outputs, strict=True)})
        feeds.append({name: tensor.numpy() for name, tensor in zip(recipe.input_names, inputs, strict=True)})
    actual = run_onnxruntime(onnx_path, feeds, names)
    try:
        found = figures(actual, expected, names)
    except ValueError as exc:  # an output of another shape
        raise BuildError(f"{recipe.component}: ONNX {exc} from PyTorch") from None
    for f in found:
        if cosine_gate is not None and not f.cosine >= cosine_gate:
            raise BuildError(f"{recipe.component}: ONNX output {f.name} differs from PyTorch (cos {f.cosine:.6f} < {cosine_gate})")
    if cosine_gate is None:  # elementwise, as np.allclose: |got - want| <= atol + rtol * |want|
        for got, want in zip(actual, expected, strict=True):
            for name in names:
                if not np.allclose(got[name], want[name], atol=atol, rtol=rtol):
                    worst = next(f for f in found if f.name == name)
                    raise BuildError(f"{recipe.component}: ONNX output {name} differs from PyTorch "
                                     f"(max |err| {worst.max_abs_error:.3g} > atol {atol} + rtol {rtol})")
    worst_err, worst_cos = max(f.max_abs_error for f in found), min(f.cosine for f in found)
    if cosine_gate is not None:
        return ParityResult(samples, worst_err, worst_cos, None, None, cosine_gate, "float16")
    return ParityResult(samples, worst_err, worst_cos, atol, rtol)
