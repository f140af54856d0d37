"""The LLM graph written from the checkpoint's safetensors shards one weight at a time, never the whole model in
memory: one decoder layer of each kind exported without weights (:mod:`.template`), stamped once per layer
(:mod:`.stamp`), each layer's tensors read, converted or quantized and appended to the external data (:mod:`.writer`).
"""

from __future__ import annotations

from pathlib import Path

from builder.export.graph import ExportedGraph
from builder.export.onnx_export import checked_graph
from builder.export.precision import ExportDtype, cast_weights
from builder.export.recipes import ExportRecipe
from builder.export.streamed.writer import write_streamed_llm
from builder.spec import ExportSpec, LimitsSpec


def export_streamed_llm(recipe: ExportRecipe, checkpoint: Path, directory: Path, spec: ExportSpec, limits: LimitsSpec,
                        dtype: ExportDtype = "float32") -> ExportedGraph:
    """The LLM graph of ``checkpoint`` in ``directory``, checked against ``recipe``'s PyTorch module as
    :func:`builder.export.onnx_export.export_graph` checks the graphs it exports."""
    cast_weights(recipe.module, dtype)
    written = write_streamed_llm(checkpoint, directory, dtype, limits=limits, opset=spec.opset)
    return checked_graph(recipe, written.path, spec, dtype)
