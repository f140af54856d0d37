"""The components a build exports, once: each one's Triton model and graph name, its spec section, the
model fact that says a checkpoint has it, and what sizes its graph (the request limit on its batch
axis, the spec limits in its export key). Stages read these rows instead of naming components."""

from __future__ import annotations

from dataclasses import dataclass

from builder.runtime.contract import INPUT_FEATURES, PIXEL_VALUES


@dataclass(frozen=True)
class Component:
    name: str  # the Triton model and graph: vision_encoder, audio_encoder, llm
    spec_key: str  # its section: components.<spec_key>
    media: str | None  # the ModelFacts field that is set when the checkpoint has it (None: always built)
    graph_input: str | None  # an encoder's batched input, the one calibrated
    batch_axis: str | None  # an encoder's batch axis: items of one kind across requests
    request_limit: str | None  # the limits key bounding that axis per request
    export_limits: tuple[str, ...]  # limits keys the exported graph depends on


VISION_ENCODER = Component("vision_encoder", "vision", "image", PIXEL_VALUES, "images", "max_images", ("max_images",))
AUDIO_ENCODER = Component("audio_encoder", "audio", "audio", INPUT_FEATURES, "clips", "max_audio_clips", ("max_audio_clips",))
LLM = Component("llm", "llm", None, None, None, None, ("max_context",))
COMPONENTS = {c.name: c for c in (VISION_ENCODER, AUDIO_ENCODER, LLM)}  # the build's order
