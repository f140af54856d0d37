"""Encoders under one of Triton's own backends (ONNX Runtime, TensorRT), batched across requests on the graph's
first axis. The ensemble calls a Python gate per encoder (``engine_gate``): it feeds a request's media to the engine
model as one batch, so Triton's batcher can put several requests' media together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from builder.compile.artifacts import CompiledModel
from builder.components import COMPONENTS, VISION_ENCODER
from builder.repository.plan import Contribution, EncoderSlot, ModelPlan, Tensor, per_request
from builder.runtime.media import audio_layout, image_layout
from builder.runtime.model_facts import ModelFacts
from builder.spec import BuildSpec
from builder.targets.base import EncoderBackend


class EngineEncoders(EncoderBackend):
    one_batch_per_request = True
    template: str  # the engine model's config template (templates/)
    name: str  # the engine model's suffix: vision_encoder_<name>

    def check(self, component: str, facts: ModelFacts) -> str | None:
        # Graphs that take one call's patches or chunks with their index tensors have no axis a backend could batch on.
        media = getattr(facts, str(COMPONENTS[component].media))
        layout = image_layout(media) if component == VISION_ENCODER.name else audio_layout(media)
        if not layout.batchable:
            return f"{component} of this model cannot run batched in Triton's own backend; build for target python"
        return None

    def engine_model_name(self, component: str) -> str:
        return f"{component}_{self.name}"

    def files(self, compiled: CompiledModel) -> dict[str, Path]:
        """Version-directory file name -> source."""
        return compiled.files

    def options(self, compiled: CompiledModel, spec: BuildSpec) -> dict[str, Any]:
        """What the engine template renders beyond the model's I/O and batching."""
        return {}

    def models(self, slot: EncoderSlot, spec: BuildSpec, facts_file: dict[str, Path]) -> Contribution:
        triton, compiled, graph = spec.triton, slot.compiled, slot.compiled.graph
        gate = ModelPlan(
            slot.component, "python_model.pbtxt.j2", inputs=tuple(map(per_request, slot.inputs)),
            outputs=(per_request(slot.output),),
            python_model="engine_gate", files=facts_file,
            parameters={"output": slot.output.name, "engine_model": self.engine_model_name(slot.component),
                        "graph_inputs": ",".join(sig.name for sig in graph.inputs)},
            instances=triton.instances,
        )
        engine = ModelPlan(
            self.engine_model_name(slot.component), self.template,
            inputs=tuple(Tensor(sig.name, sig.data_type, sig.dims[1:]) for sig in graph.inputs),
            outputs=tuple(Tensor(sig.name, sig.data_type, sig.dims[1:]) for sig in graph.outputs),
            files=self.files(compiled), max_batch_size=triton.max_batch_size, instances=triton.instances,
            dynamic_batching=triton.dynamic_batching, max_queue_delay_us=triton.max_queue_delay_us,
            serves=compiled, template_options=self.options(compiled, spec),
        )
        return Contribution(gate, (engine,))
