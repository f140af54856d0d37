"""The LLM graph written from the checkpoint's safetensors shards one weight at a time, never the whole model in
memory: one decoder layer of each kind exported without weights (:mod:`.template`), stamped once per layer
(:mod:`.stamp`), each layer's tensors read, converted or quantized and appended to the external data (:mod:`.writer`).

An FP32 or FP16 LLM is written here and checked against PyTorch; an INT8 or INT4 one only has its signature recorded
here (:func:`record_quantized_llm`): the quantize stage writes its forms.
"""

from __future__ import annotations

import json
from pathlib import Path

from builder.components import LLM
from builder.export.graph import ExportedGraph, signature, to_json
from builder.export.onnx_export import checked_graph
from builder.export.precision import ExportDtype, cast_weights
from builder.export.recipes import ExportRecipe
from builder.export.streamed.stamp import stamp
from builder.export.streamed.template import export_template
from builder.export.streamed.writer import write_streamed_llm
from builder.spec import ExportSpec, LimitsSpec


def export_streamed_llm(recipe: ExportRecipe, checkpoint: Path, directory: Path, spec: ExportSpec, limits: LimitsSpec,
                        dtype: ExportDtype = "float32") -> ExportedGraph:
    """The LLM graph of ``checkpoint`` in ``directory``, checked against ``recipe``'s PyTorch module as
    :func:`builder.export.onnx_export.export_graph` checks the graphs it exports."""
    cast_weights(recipe.module, dtype)
    written = write_streamed_llm(checkpoint, directory, dtype, limits=limits, opset=spec.opset)
    return checked_graph(recipe, written.path, spec, dtype, written.attention)


def record_quantized_llm(checkpoint: Path, directory: Path, spec: ExportSpec, limits: LimitsSpec) -> ExportedGraph:
    """An LLM served in INT8 or INT4: its graph's inputs and outputs in ``directory/export.json``, no graph. The
    quantize stage writes each candidate from the shards and gates it against the checkpoint in PyTorch; an FP32
    graph here would cost 4 bytes per parameter on disk and in ONNX Runtime (96 GB at 24B)."""
    template = export_template(checkpoint, "float32", limits, spec.opset)
    graph = stamp(template)
    inputs, outputs = signature(graph.inputs, graph.outputs)
    recorded = ExportedGraph(LLM.name, None, inputs, outputs, None, template.attention)
    (directory / "export.json").write_text(json.dumps(to_json(recorded), indent=2))
    return recorded
