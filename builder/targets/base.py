"""What a build target is: one encoder backend and one LLM backend, each an object that says what it builds
from, the forms its ladder walks, what compiling makes of a graph, and the Triton models it contributes.

The stages provide the primitives (``quantize.ladder``'s rungs, ``compile.stage``, ``repository.plan``); a
backend chooses among them. Targets sit above the stages: the build and the CLI import them, no stage does.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.cache import StageCache
from builder.compile.artifacts import CompiledModel
from builder.compile.stage import CompileContext, as_exported
from builder.components import COMPONENTS, LLM
from builder.errors import SpecError
from builder.export.graph import ExportedGraph
from builder.quantize.ladder import LlmRung
from builder.quantize.qdq import QdqLayout
from builder.repository.plan import Contribution, EncoderSlot, Tensor
from builder.runtime.generation import LanguageModelRunner, SequenceRunner
from builder.runtime.model_facts import ModelFacts
from builder.spec import BuildSpec, QuantizeSpec


class EncoderBackend(ABC):
    """How a target serves each encoder graph."""

    qdq_layout: QdqLayout  # the INT8 Q/DQ activation x weight types its runtime executes fast
    fp16_before_fp32: bool = False  # a failed INT8 gate tries FP16 before FP32 (worth it on a GPU only)
    one_batch_per_request: bool = False  # a request's images (clips) must fit one batch of the engine

    def check(self, component: str, facts: ModelFacts) -> str | None:
        """Why this backend cannot serve ``component`` of this model (None: it can); asked before any export."""
        return None

    def compile(self, context: CompileContext, graph: ExportedGraph, precision: str) -> CompiledModel:
        return as_exported(graph, precision)

    @abstractmethod
    def models(self, slot: EncoderSlot, spec: BuildSpec, facts_file: dict[str, Path]) -> Contribution: ...


class LlmBackend(ABC):
    """How a target serves the LLM."""

    def check(self, facts: ModelFacts) -> str | None:
        """Why this backend cannot serve this model's decoder (None: it can); asked before any export."""
        return None

    @abstractmethod
    def rungs(self, requested: str, spec: QuantizeSpec) -> list[LlmRung]:
        """The forms an INT8 / INT4 request walks, in order, before FP32 (which always passes: it is the reference)."""

    def gate_runner(self, graph: Path, facts: ModelFacts) -> SequenceRunner:
        """What the LLM and pipeline gates run a candidate graph with on the build machine: ONNX Runtime (a TensorRT
        plan is then checked against the graph it was built from, on the GPU, by ``compile_plan``)."""
        return LanguageModelRunner(str(graph), facts)

    def compile(self, context: CompileContext, graph: ExportedGraph, precision: str) -> CompiledModel:
        return as_exported(graph, precision)

    @abstractmethod
    def models(self, compiled: CompiledModel, inputs: tuple[Tensor, ...], spec: BuildSpec,
               files: dict[str, Path]) -> Contribution: ...


@dataclass(frozen=True)
class Target:
    name: str
    summary: str  # one line for --help and the README
    encoders: EncoderBackend
    llm: LlmBackend
    needs_gpu: bool = False
    settings: str | None = None  # its own spec section (applies to this target only)

    def prepare(self, spec: BuildSpec, cache: StageCache, output: Path, alternatives: str) -> CompileContext:
        """What compiling needs; a target that needs a GPU stops here, with one line, if this machine has none
        (``alternatives``: the targets that build without one)."""
        if not self.needs_gpu:
            return CompileContext(spec, cache, output)
        from builder.compile.tensorrt_build import detect_device

        return CompileContext(spec, cache, output, detect_device(self.name, alternatives))

    def check_spec(self, spec: BuildSpec) -> None:
        """Spec rules that hold for this target only."""
        if self.encoders.one_batch_per_request:
            for key in (c.request_limit for c in COMPONENTS.values() if c.request_limit):
                if getattr(spec.limits, key) > spec.triton.max_batch_size:
                    raise SpecError(
                        f"limits.{key} ({getattr(spec.limits, key)}) exceeds triton.max_batch_size "
                        f"({spec.triton.max_batch_size}): target {self.name} batches one request's inputs in one engine batch"
                    )

    def check_model(self, components: list[str], facts: ModelFacts) -> list[str]:
        """Why this target cannot serve this model, one line per reason (empty: it can)."""
        reasons = [self.encoders.check(c, facts) for c in components if c != LLM.name] + [self.llm.check(facts)]
        return [f"target {self.name}: {reason}" for reason in reasons if reason]


def changed_keys(spec: BuildSpec, section: str) -> dict[str, Any]:
    """The keys of a spec section set to other than their defaults."""
    given, default = spec.section(section), dataclasses.asdict(getattr(BuildSpec(), section))
    return {k: v for k, v in given.items() if v != default[k]}
