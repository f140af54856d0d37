"""The LLM backend of the ONNX Runtime targets: the exported graph, its weights as ``MatMulNBits`` when quantized,
run by the decode model (``llm``, a Python model) with ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

from builder.compile.artifacts import CompiledModel
from builder.quantize.ladder import LlmRung, matmulnbits_rungs
from builder.repository.plan import Contribution, Tensor, decode_model
from builder.spec import BuildSpec, QuantizeSpec
from builder.targets.base import LlmBackend


class OnnxRuntimeLlm(LlmBackend):
    def rungs(self, requested: str, spec: QuantizeSpec) -> list[LlmRung]:
        return matmulnbits_rungs(requested, spec)

    def models(self, compiled: CompiledModel, inputs: tuple[Tensor, ...], spec: BuildSpec,
               files: dict[str, Path]) -> Contribution:
        return Contribution(decode_model(compiled, inputs, spec, files, runner={}))
