"""Which models the repository holds, their tensors and how the ensembles wire them.

The front (preprocess, the encoders' slots, fuse) is planned here; each encoder and the LLM are served by the
models their backends contribute (``builder/targets``); the entry points are wired from every step's declared
inputs and outputs (:func:`wire`). Python decides here; the config text lives in ``templates/``. The plan is
plain data that :mod:`builder.repository.assemble` renders and :mod:`builder.repository.validate` checks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from builder.compile.artifacts import CompiledModel
from builder.components import AUDIO_ENCODER, LLM, VISION_ENCODER
from builder.errors import BuildError
from builder.runtime.contract import (
    ANSWER_OUTPUTS,
    AUDIO_EMBEDS,
    AUDIO_FRAMES,
    CANCEL_INPUT,
    CLIENT_INPUTS,
    CLIENT_OUTPUTS,
    DECODE_MODEL,
    FINISHED_OUTPUT,
    IMAGE_EMBEDS,
    IMAGE_SIZES,
    INPUT_FEATURES,
    INPUT_IDS,
    MEDIA_INPUTS,
    MULTIMODAL_EMBEDS,
    MULTIMODAL_MASK,
    PIXEL_VALUES,
    PROMPT_POSITIONS,
    PROMPT_TOKENS_OUTPUT,
    SAMPLING_INPUTS,
    SESSION_INPUT,
    STREAM_INPUT,
    STREAMING_ENSEMBLE,
    TEXT_INPUT,
    UNARY_ENSEMBLE,
    Tensor,
)
from builder.runtime.media import audio_layout
from builder.runtime.model_facts import ModelFacts
from builder.runtime.preprocess import RequestLimits
from builder.spec import BuildSpec


@dataclass(frozen=True)
class EnsembleStep:
    model: str
    inputs: dict[str, str]  # model input -> ensemble tensor
    outputs: dict[str, str]  # model output -> ensemble tensor


@dataclass(frozen=True)
class ModelPlan:
    name: str
    template: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    python_model: str | None = None  # module in builder/repository/python_models/, copied as model.py
    files: dict[str, Path] = field(default_factory=dict)  # version-directory file name -> source
    parameters: dict[str, str] = field(default_factory=dict)
    max_batch_size: int = 0
    decoupled: bool = False
    instances: int = 1
    dynamic_batching: bool = False
    max_queue_delay_us: int = 0
    steps: tuple[EnsembleStep, ...] = ()  # an ensemble's, or those a Python model runs itself (steps.json)
    serves: CompiledModel | None = None  # the graph whose signature the config must match
    adds_batch_axis: bool = False  # the model feeds one request as a batch of 1 (the decode loop)
    template_options: dict[str, Any] = field(default_factory=dict)  # what only its template uses


@dataclass(frozen=True)
class Contribution:
    """The models one backend adds for one component: ``step``, the model the ensembles call (its declared inputs
    and outputs wire it), and the models only ``step`` calls (e.g. an engine under Triton's own backend)."""

    step: ModelPlan
    helpers: tuple[ModelPlan, ...] = ()


@dataclass(frozen=True)
class EncoderSlot:
    """What the front hands an encoder and wants back, [items, ...] (one request carries them as
    ``per_request``: a leading 1), and the compiled graph that computes them."""

    component: str
    compiled: CompiledModel
    inputs: tuple[Tensor, ...]
    output: Tensor


class EncoderModels(Protocol):
    def models(self, slot: EncoderSlot, spec: BuildSpec, facts_file: dict[str, Path]) -> Contribution: ...


class LlmModels(Protocol):
    def models(self, compiled: CompiledModel, inputs: tuple[Tensor, ...], spec: BuildSpec,
               files: dict[str, Path]) -> Contribution: ...


def plan_repository(spec: BuildSpec, facts: ModelFacts, compiled: dict[str, CompiledModel], shared: dict[str, Path],
                    encoders: EncoderModels, llm: LlmModels) -> list[ModelPlan]:
    """The front (preprocess, each encoder as ``encoders`` serves it, fuse), the LLM's models as ``llm`` serves it,
    and the client entry points, wired by each step's declared inputs and outputs.

    ``compiled`` maps component -> compiled graph (only the components the build has); ``shared`` the files several
    Python models need (``model_facts.json``, ``tokenizer.json``, the chat template files)."""
    hidden = facts.hidden_size
    per_model = dict(instances=spec.triton.instances)
    facts_file = {"model_facts.json": shared["model_facts.json"]}
    slots: list[EncoderSlot] = []
    if (vision := compiled.get(VISION_ENCODER.name)) is not None:  # a request's images of several sizes: each size a batch
        slots.append(EncoderSlot(VISION_ENCODER.name, vision, (Tensor(PIXEL_VALUES, "TYPE_FP32", (-1, 3, -1, -1)),
                                 Tensor(IMAGE_SIZES, "TYPE_INT64", (-1, 2))), Tensor(IMAGE_EMBEDS, "TYPE_FP32", (-1, hidden))))
    if (audio := compiled.get(AUDIO_ENCODER.name)) is not None:
        assert facts.audio is not None
        clip_width = audio_layout(facts.audio).clip_width or -1  # -1: the clips' own frames
        slots.append(EncoderSlot(AUDIO_ENCODER.name, audio, (
            Tensor(INPUT_FEATURES, "TYPE_FP32", (-1, facts.audio.num_mel_bins, clip_width)),
            Tensor(AUDIO_FRAMES, "TYPE_INT64", (-1,))), Tensor(AUDIO_EMBEDS, "TYPE_FP32", (-1, hidden))))
    # A decoder with M-RoPE takes the prompt's [3, S] positions, which only preprocess can compute (image sizes).
    positions = (Tensor(PROMPT_POSITIONS, "TYPE_INT64", (facts.position_rows, -1)),) if facts.position_rows != 1 else ()
    preprocess = ModelPlan(
        "preprocess", "python_model.pbtxt.j2", inputs=(TEXT_INPUT, *MEDIA_INPUTS),
        outputs=(Tensor(INPUT_IDS, "TYPE_INT64", (-1,)), *positions, *(per_request(t) for s in slots for t in s.inputs),
                 PROMPT_TOKENS_OUTPUT),
        python_model="preprocess", files=dict(shared),
        parameters=RequestLimits.from_spec(spec.limits).parameters(),  # read back by RequestLimits.from_parameters
        **per_model,
    )
    served = [encoders.models(slot, spec, facts_file) for slot in slots]
    fuse = ModelPlan(
        "fuse", "python_model.pbtxt.j2",
        inputs=(Tensor(INPUT_IDS, "TYPE_INT64", (-1,)), *(dataclasses.replace(per_request(s.output), optional=True) for s in slots)),
        outputs=(Tensor(MULTIMODAL_EMBEDS, "TYPE_FP32", (-1, hidden)), Tensor(MULTIMODAL_MASK, "TYPE_BOOL", (-1,))),
        python_model="fuse", files=facts_file, **per_model,
    )
    llm_inputs = (Tensor(INPUT_IDS, "TYPE_INT64", (-1,)), Tensor(MULTIMODAL_EMBEDS, "TYPE_FP32", (-1, hidden)),
                  Tensor(MULTIMODAL_MASK, "TYPE_BOOL", (-1,)), *positions)
    decode = llm.models(compiled[LLM.name], llm_inputs, spec, {**facts_file, "tokenizer.json": shared["tokenizer.json"]})
    steps = wire([preprocess, *(c.step for c in served), fuse, decode.step], CLIENT_INPUTS, CLIENT_OUTPUTS)
    models = [preprocess, *(m for c in served for m in (c.step, *c.helpers)), fuse, decode.step, *decode.helpers]
    # Python models, not Triton ensembles: Triton 2.51 does not pass a client's cancellation (or a gRPC deadline) on to
    # an ensemble step already running, so only the model the client called can see it (request.is_cancelled()). They
    # run the steps with plain BLS calls, the last one as a session on the decode model that they poll
    # (mmtb_runtime.sessions). A unary infer on a decoupled model is refused: two entry points. `execute` blocks for
    # the request it serves: one instance per sequence of a full decode batch.
    entry = {"python_model": "entry_point", "steps": steps, "instances": spec.triton.max_batch_size * spec.triton.instances}
    if spec.triton.entry_points != "streaming":
        models.append(ModelPlan(UNARY_ENSEMBLE, "python_model.pbtxt.j2", inputs=CLIENT_INPUTS, outputs=CLIENT_OUTPUTS, **entry))
    if spec.triton.entry_points != "unary":
        models.append(ModelPlan(STREAMING_ENSEMBLE, "python_model.pbtxt.j2", inputs=(*CLIENT_INPUTS, STREAM_INPUT),
                                outputs=CLIENT_OUTPUTS, decoupled=True, **entry))
    return models


def wire(models: list[ModelPlan], inputs: tuple[Tensor, ...], outputs: tuple[Tensor, ...]) -> tuple[EnsembleStep, ...]:
    """The ensemble steps running ``models`` in order, from their declared tensors: an input is the client's
    (``inputs``) or an earlier step's output of that name; an output goes to the client (``outputs``) or, as
    ``_name``, to the later steps that read it. An optional input nothing produces is left out; a required one
    is a planning error."""
    client_in, client_out = {t.name for t in inputs}, {t.name for t in outputs}
    produced: set[str] = set()
    steps = []
    for index, model in enumerate(models):
        wired_in = {}
        for tensor in model.inputs:
            if tensor.name in client_in:
                wired_in[tensor.name] = tensor.name
            elif tensor.name in produced:
                wired_in[tensor.name] = f"_{tensor.name}"
            elif not tensor.optional:
                raise BuildError(f"{model.name}: input {tensor.name} is neither a client input nor an earlier step's output")
        read_later = {t.name for later in models[index + 1:] for t in later.inputs}
        wired_out = {t.name: t.name if t.name in client_out else f"_{t.name}"
                     for t in model.outputs if t.name in client_out or t.name in read_later}
        produced.update(name for name, to in wired_out.items() if to.startswith("_"))
        steps.append(EnsembleStep(model.name, wired_in, wired_out))
    return tuple(steps)


def decode_model(compiled: CompiledModel, inputs: tuple[Tensor, ...], spec: BuildSpec, files: dict[str, Path],
                 runner: dict[str, str]) -> ModelPlan:
    """The Python model holding the LLM's weights (``llm``), running the decode loop on ``compiled`` with the runner
    its backend names (``runner``: parameters, empty for ONNX Runtime). Its prompt inputs are optional because a
    session's poll (from ``ensemble_stream``) carries only the session."""
    lim, triton = spec.limits, spec.triton
    return ModelPlan(
        DECODE_MODEL, "python_model.pbtxt.j2",
        inputs=(*(dataclasses.replace(t, optional=True) for t in inputs), *SAMPLING_INPUTS, SESSION_INPUT, CANCEL_INPUT),
        outputs=(*ANSWER_OUTPUTS, FINISHED_OUTPUT), python_model=DECODE_MODEL, files={**compiled.files, **files},
        parameters={
            "max_tokens": str(lim.max_tokens), "default_max_tokens": str(lim.default_max_tokens),
            "max_context": str(lim.max_context), "max_decode_batch": str(triton.max_batch_size),
            "prefix_cache_bytes": str(triton.prefix_cache_mb << 20),
            "kv_budget_tokens": str(triton.kv_budget_tokens or triton.max_batch_size * lim.max_context),
            "kv_queue_timeout_s": str(triton.kv_queue_timeout_s), "stream_interval_ms": str(triton.stream_interval_ms),
            **runner,
        },
        serves=compiled, adds_batch_axis=True, instances=triton.instances,
    )


def per_request(tensor: Tensor) -> Tensor:
    """An encoder tensor as one request carries it between models: a leading axis of 1."""
    return dataclasses.replace(tensor, dims=(1, *tensor.dims))
