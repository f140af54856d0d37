"""The compile stage: turns each exported (and quantized) ONNX graph into what the target loads.

This is the seam where build targets plug in:
- ``python`` (default, runs anywhere): the ONNX graph itself, run by ONNX Runtime inside
  Python-backend models;
- ``onnxruntime`` / ``tensorrt``: Triton's own backends (issue #6); not built yet.
"""

from __future__ import annotations

from builder.compile.artifacts import CompiledModel
from builder.errors import BuildError
from builder.export.onnx_export import ExportedGraph

SUPPORTED_TARGETS = ("python",)


def compile_graph(graph: ExportedGraph, target: str, precision: str) -> CompiledModel:
    if target == "python":
        return CompiledModel(graph.component, graph.path, precision, graph)
    raise BuildError(
        f"target {target!r} is not available in this build; targets that work here: {', '.join(SUPPORTED_TARGETS)}"
    )
