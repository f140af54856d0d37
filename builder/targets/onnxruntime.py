"""Target ``onnxruntime``: the encoders' ONNX graphs under Triton's ONNX Runtime backend, batched across requests
(optionally through its TensorRT execution provider); the LLM decodes in ``llm`` with ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from builder.compile.artifacts import CompiledModel
from builder.onnx_files import data_files
from builder.quantize.qdq import U8S8
from builder.spec import BuildSpec
from builder.targets.base import Target
from builder.targets.engine_encoders import EngineEncoders
from builder.targets.onnx_llm import OnnxRuntimeLlm


class OnnxRuntimeEncoders(EngineEncoders):
    name = "onnxruntime"
    template = "onnxruntime_model.pbtxt.j2"
    qdq_layout = U8S8

    def files(self, compiled: CompiledModel) -> dict[str, Path]:
        """Triton's ONNX Runtime backend finds a graph's external weights only when ``model.onnx`` is a directory
        holding the graph and its data; a graph in one file stays a file."""
        return {"model.onnx/model.onnx": compiled.path} if data_files(compiled.path) else compiled.files

    def options(self, compiled: CompiledModel, spec: BuildSpec) -> dict[str, Any]:
        return {"tensorrt_accelerator": spec.onnxruntime.tensorrt_accelerator}


ONNXRUNTIME = Target(
    "onnxruntime", "encoders under Triton's ONNX Runtime backend, batched across requests (CPU or GPU)",
    encoders=OnnxRuntimeEncoders(), llm=OnnxRuntimeLlm(), settings="onnxruntime",
)
