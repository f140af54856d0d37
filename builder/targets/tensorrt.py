"""Target ``tensorrt``: strongly typed TensorRT plans, one per GPU architecture, for the encoders (Triton's TensorRT
backend) and the LLM (driven by ``llm``). INT8 in the forms TensorRT parses: symmetric S8S8 Q/DQ for the encoders,
weight-only Q/DQ for the LLM; FP16 before FP32 as fallback. Verified on CPU up to the device boundary only."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from builder.compile.artifacts import CompiledModel
from builder.compile.stage import CompileContext, compile_plan
from builder.export.graph import ExportedGraph
from builder.quantize.ladder import FP16_RUNG, LlmRung, qdq_weight_rungs
from builder.quantize.qdq import S8S8
from builder.repository.plan import Contribution, Tensor, decode_model
from builder.runtime.contract import DECODE_MODEL
from builder.runtime.model_facts import ModelFacts
from builder.spec import BuildSpec, QuantizeSpec
from builder.targets.base import LlmBackend, Target
from builder.targets.engine_encoders import EngineEncoders


class TensorRTEncoders(EngineEncoders):
    name = "tensorrt"
    template = "tensorrt_model.pbtxt.j2"
    qdq_layout = S8S8
    fp16_before_fp32 = True

    def compile(self, context: CompileContext, graph: ExportedGraph, precision: str) -> CompiledModel:
        return compile_plan(context, graph, precision, self.engine_model_name(graph.component))

    def options(self, compiled: CompiledModel, spec: BuildSpec) -> dict[str, Any]:
        return {"default_model_filename": compiled.path.name, "cc_model_filenames": compiled.cc_model_filenames}


class TensorRTLlm(LlmBackend):
    """The LLM graph as a plan per GPU, driven by the decode model's TensorRT runner (runtime.trt_generation)."""

    def check(self, facts: ModelFacts) -> str | None:
        if facts.position_rows != 1:
            return "the TensorRT decode loop feeds plain positions, this model's decoder takes M-RoPE positions; build for target python"
        return None

    def rungs(self, requested: str, spec: QuantizeSpec) -> list[LlmRung]:
        return [*qdq_weight_rungs(requested, spec), FP16_RUNG]

    def compile(self, context: CompileContext, graph: ExportedGraph, precision: str) -> CompiledModel:
        return dataclasses.replace(compile_plan(context, graph, precision, DECODE_MODEL),
                                   kv_cache="appended each step (the exported graph, standard ops): the runner holds "
                                            "each sequence's cache and the batch's past and present")

    def models(self, compiled: CompiledModel, inputs: tuple[Tensor, ...], spec: BuildSpec,
               files: dict[str, Path]) -> Contribution:
        plans = ";".join(f"{p.compute_capability}={p.file}" for p in compiled.plans)
        return Contribution(decode_model(compiled, inputs, spec, files, runner={"runner": "tensorrt", "plans": plans}))


TENSORRT = Target(
    "tensorrt", "TensorRT plans per GPU architecture (needs an NVIDIA GPU and the tensorrt package)",
    encoders=TensorRTEncoders(), llm=TensorRTLlm(), needs_gpu=True, settings="tensorrt",
)
