"""Target ``onnxruntime``: the encoders' ONNX graphs under Triton's ONNX Runtime backend, batched
across requests (optionally through its TensorRT execution provider); the LLM decodes in ``llm``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from builder.targets.base import Target

if TYPE_CHECKING:
    from builder.compile.artifacts import CompiledModel
    from builder.spec import TritonSpec


class OnnxRuntimeTarget(Target):
    def engine_options(self, compiled: CompiledModel, triton: TritonSpec) -> dict[str, Any]:
        return {"tensorrt_accelerator": triton.ort_tensorrt_accelerator}


ONNXRUNTIME = OnnxRuntimeTarget(
    "onnxruntime", "encoders under Triton's ONNX Runtime backend, batched across requests (CPU or GPU)",
    engine_template="onnxruntime_model.pbtxt.j2", onnx_as_directory=True,
    own_settings=("triton.ort_tensorrt_accelerator",),
)
