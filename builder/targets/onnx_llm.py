"""The LLM backend of the ONNX Runtime targets: the exported graph, its weights as ``MatMulNBits`` when quantized and
its attention fused (the KV cache updated in place), run by the decode model (``llm``, a Python model) with ONNX Runtime."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from builder.compile.artifacts import CompiledModel
from builder.compile.ort_llm_graph import unfusable
from builder.compile.stage import CompileContext, as_exported, in_place_llm
from builder.export.graph import ExportedGraph
from builder.quantize.ladder import LlmRung, matmulnbits_rungs
from builder.repository.plan import Contribution, Tensor, decode_model
from builder.spec import BuildSpec, QuantizeSpec
from builder.targets.base import LlmBackend


class OnnxRuntimeLlm(LlmBackend):
    def compile(self, context: CompileContext, graph: ExportedGraph, precision: str) -> CompiledModel:
        """The graph with its attention fused and the KV cache updated in place, when the decoder's attention is what
        GroupQueryAttention computes (the export says so, and :func:`unfusable` finds nothing against it); otherwise
        the graph itself, its cache appended each step."""
        if graph.attention is None:
            why = "the family's decoder attends in a way GroupQueryAttention does not compute (its wrapper says so)"
        else:
            why = unfusable(graph.attention)
        if why is None:
            return in_place_llm(context, graph, precision)
        return dataclasses.replace(as_exported(graph, precision), kv_cache=f"appended each step (as exported): {why}")

    def rungs(self, requested: str, spec: QuantizeSpec) -> list[LlmRung]:
        return matmulnbits_rungs(requested, spec)

    def models(self, compiled: CompiledModel, inputs: tuple[Tensor, ...], spec: BuildSpec,
               files: dict[str, Path]) -> Contribution:
        return Contribution(decode_model(compiled, inputs, spec, files, runner={}))
