"""Target ``tensorrt``: strongly typed TensorRT plans, one per GPU architecture, for the encoders
(Triton's TensorRT backend) and the LLM (driven by ``llm``). INT8 in the forms TensorRT parses:
symmetric S8S8 Q/DQ for the encoders, weight-only Q/DQ for the LLM; FP16 before FP32 as fallback."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from builder.targets.base import Target

if TYPE_CHECKING:
    from builder.compile.artifacts import CompiledModel
    from builder.spec import TritonSpec


class TensorRTTarget(Target):
    def engine_options(self, compiled: CompiledModel, triton: TritonSpec) -> dict[str, Any]:
        return {"default_model_filename": compiled.path.name, "cc_model_filenames": compiled.cc_model_filenames}


TENSORRT = TensorRTTarget(
    "tensorrt", "TensorRT plans per GPU architecture (needs an NVIDIA GPU and the tensorrt package)",
    engine_template="tensorrt_model.pbtxt.j2", compiles_to="tensorrt_plan", needs_gpu=True,
    encoder_qdq_layout="S8S8", llm_int8_form="qdq", fp16_before_fp32=True,
)
