"""What a build target is: the facts every stage reads about it, stated once per target module.

A target decides how the compiled graphs are served (a Python model running ONNX Runtime, or one of
Triton's own backends batching the encoders), the INT8 forms its runtime executes, and what it
needs from the build machine. Data only: the stages that act on it import it, never the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from builder.components import LLM

if TYPE_CHECKING:  # annotations only: targets sit below the stages that hand these in
    from builder.compile.artifacts import CompiledModel
    from builder.spec import TritonSpec


@dataclass(frozen=True)
class Target:
    name: str
    summary: str  # one line for --help and the README
    # The Triton backend config template of each encoder's engine model, batched across requests behind
    # a Python gate; None: the encoder's Python model runs its ONNX graph with ONNX Runtime itself.
    engine_template: str | None = None
    compiles_to: Literal["onnx", "tensorrt_plan"] = "onnx"
    needs_gpu: bool = False
    encoder_qdq_layout: Literal["U8S8", "S8S8"] = "U8S8"  # the encoders' INT8 Q/DQ activation x weight types
    llm_int8_form: Literal["matmulnbits", "qdq"] = "matmulnbits"  # the LLM's weight-only INT8 graph
    fp16_before_fp32: bool = False  # a failed INT8 gate tries FP16 before settling on FP32
    onnx_as_directory: bool = False  # the backend finds external weights only in a model.onnx/ directory
    own_settings: tuple[str, ...] = ()  # spec keys (section.key) that apply to this target only

    @property
    def batches_encoders(self) -> bool:
        """Triton's own backend runs the encoders: a request's images must fit one engine batch."""
        return self.engine_template is not None

    def engine_model_name(self, component: str) -> str:
        """The Triton model that loads a component's compiled file. The LLM's is always loaded by the
        ``llm`` decode model; with an engine backend each encoder is a model of its own."""
        return component if component == LLM.name or not self.batches_encoders else f"{component}_{self.name}"

    def engine_options(self, compiled: CompiledModel, triton: TritonSpec) -> dict[str, Any]:
        """What the engine template renders beyond the model's I/O and batching."""
        return {}
