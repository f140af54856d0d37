"""Target ``python`` (default, runs anywhere): every graph is run by ONNX Runtime inside the repository's Python
models; an encoder's model runs the media of the requests Triton batched together, in one graph call per size."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from builder.quantize.qdq import U8S8
from builder.repository.plan import Contribution, EncoderSlot, ModelPlan
from builder.spec import BuildSpec
from builder.targets.base import EncoderBackend, Target
from builder.targets.onnx_llm import OnnxRuntimeLlm


class PythonEncoders(EncoderBackend):
    qdq_layout = U8S8  # ONNX Runtime's fast x86 INT8 kernels

    def models(self, slot: EncoderSlot, spec: BuildSpec, facts_file: dict[str, Path]) -> Contribution:
        triton = spec.triton
        return Contribution(ModelPlan(
            slot.component, "python_model.pbtxt.j2", inputs=tuple(dataclasses.replace(t, ragged=True) for t in slot.inputs),
            outputs=(slot.output,), python_model="encoder", files={"model.onnx": slot.compiled.path, **facts_file},
            parameters={"output": slot.output.name}, max_batch_size=triton.max_batch_size,
            dynamic_batching=triton.dynamic_batching, max_queue_delay_us=triton.max_queue_delay_us, instances=triton.instances,
        ))


PYTHON = Target("python", "ONNX graphs run by ONNX Runtime in Triton's Python backend (any machine)",
                encoders=PythonEncoders(), llm=OnnxRuntimeLlm())
