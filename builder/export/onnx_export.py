"""The export stage: each component to ONNX with dynamic axes, checked against PyTorch."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import torch

from builder.errors import BuildError
from builder.export.graph import AttentionLayout, ExportedGraph, graph_signature, to_json
from builder.export.parity import check_parity
from builder.export.precision import ExportDtype, cast_weights
from builder.export.recipes import ExportRecipe
from builder.onnx_files import EXTERNAL_DATA_THRESHOLD
from builder.runtime.contract import PAST_PREFIX
from builder.spec import ExportSpec


def export_graph(recipe: ExportRecipe, directory: Path, spec: ExportSpec, dtype: ExportDtype = "float32") -> ExportedGraph:
    """Exports ``recipe`` in ``dtype`` into ``directory/model.onnx`` and records the parity check in ``export.json``."""
    path = directory / "model.onnx"
    cast_weights(recipe.module, dtype)
    example = recipe.sample_inputs(torch.Generator().manual_seed(0), 0)
    chatter = io.StringIO()
    for chatty in ("torch.onnx", "onnxscript", "onnx_ir"):  # "torchvision is not installed", constant-folding notes
        logging.getLogger(chatty).setLevel(logging.ERROR)
    try:
        # The exporter prints progress lines and warnings of its own; our progress bar says enough.
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                recipe.module, example, str(path), input_names=recipe.input_names, output_names=recipe.output_names,
                dynamic_shapes=_dynamic_shapes_by_position(recipe), opset_version=spec.opset, dynamo=True,
                external_data=_needs_external_data(recipe.module),
            )
    except Exception as exc:  # the exporter raises many types; all mean the same to the user
        raise BuildError(f"{recipe.component}: ONNX export failed: {str(exc).splitlines()[0]}") from exc
    return checked_graph(recipe, path, spec, dtype)


def checked_graph(recipe: ExportRecipe, path: Path, spec: ExportSpec, dtype: ExportDtype,
                  attention: AttentionLayout | None = None) -> ExportedGraph:
    """``path`` against ``recipe``'s module on fresh inputs (FP32: the tolerances, FP16: the cosine), recorded in
    ``export.json`` beside it (with the LLM's ``attention``)."""
    cosine_gate = spec.fp16_min_cosine if dtype == "float16" else None
    parity = check_parity(recipe, path, spec.parity_samples, spec.atol, spec.rtol, cosine_gate=cosine_gate)
    inputs, outputs = graph_signature(path)
    exported = ExportedGraph(recipe.component, path, inputs, outputs, parity, attention)
    (path.parent / "export.json").write_text(json.dumps(to_json(exported), indent=2))
    return exported


def _dynamic_shapes_by_position(recipe: ExportRecipe) -> tuple:
    """torch.export wants dynamic shapes per forward() argument; ``past`` is the *args tuple."""
    named = [recipe.dynamic_shapes.get(name) for name in recipe.input_names if not name.startswith(PAST_PREFIX)]
    return (*named, recipe.dynamic_shapes["past"]) if "past" in recipe.dynamic_shapes else tuple(named)


def _needs_external_data(module: torch.nn.Module) -> bool:
    return sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_THRESHOLD
