"""Which models the repository holds, their tensors and how the ensembles wire them.

Python decides here; the config text lives in ``templates/``. The plan is plain data that
:mod:`builder.repository.assemble` renders and :mod:`builder.repository.validate` checks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.compile.artifacts import CompiledModel
from builder.components import LLM
from builder.errors import BuildError
from builder.onnx_files import data_files
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
from builder.runtime.media import audio_layout, image_layout
from builder.runtime.model_facts import ModelFacts
from builder.runtime.preprocess import RequestLimits
from builder.spec import BuildSpec
from builder.targets import TARGETS


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


def plan_repository(spec: BuildSpec, facts: ModelFacts, compiled: dict[str, CompiledModel], shared: dict[str, Path]) -> list[ModelPlan]:
    """``compiled`` maps component -> compiled graph (only the components the build has); ``shared`` the
    files several Python models need (``model_facts.json``, ``tokenizer.json``, the chat template files)."""
    lim, triton = spec.limits, spec.triton
    hidden = facts.hidden_size
    per_model = dict(instances=triton.instances)
    facts_file = {"model_facts.json": shared["model_facts.json"]}
    vision, audio = compiled.get("vision_encoder"), compiled.get("audio_encoder")
    target = TARGETS[spec.target]
    # Graphs that take one call's patches or chunks with their index tensors have no axis a backend could batch on,
    # and the TensorRT decode loop feeds plain positions: such models serve on target python only.
    one_call_graphs = [name for name, takes_one_call in (
        ("vision_encoder", vision is not None and facts.image is not None and not image_layout(facts.image).batchable),
        ("audio_encoder", audio is not None and facts.audio is not None and not audio_layout(facts.audio).batchable))
        if takes_one_call]
    if target.batches_encoders and one_call_graphs:
        raise BuildError(f"target {spec.target}: {', '.join(one_call_graphs)} of this model cannot run batched in "
                         f"Triton's own backend; build for target python")
    if _llm_runner(compiled[LLM.name]) and facts.position_rows != 1:
        raise BuildError(f"target {spec.target}: the TensorRT decode loop feeds plain positions, this model's decoder "
                         f"takes M-RoPE positions; build for target python")

    # An encoder's tensors per request, [1, items, ...]: the leading 1 is the request. Batched across
    # requests (max_batch_size > 0, ragged) that 1 is Triton's batch axis, so a request without images
    # is a batch of 1 holding 0 of them, which Triton's batcher accepts (a batch of 0 it refuses).
    encoders: list[tuple[str, CompiledModel, tuple[Tensor, ...], Tensor]] = []
    if vision is not None:  # a request's images of several sizes: the model runs each size as a batch
        encoders.append(("vision_encoder", vision, (Tensor(PIXEL_VALUES, "TYPE_FP32", (-1, 3, -1, -1)),
                         Tensor(IMAGE_SIZES, "TYPE_INT64", (-1, 2))), Tensor(IMAGE_EMBEDS, "TYPE_FP32", (-1, hidden))))
    if audio is not None:
        assert facts.audio is not None
        clip_width = audio_layout(facts.audio).clip_width or -1  # -1: the clips' own frames
        encoders.append(("audio_encoder", audio, (Tensor(INPUT_FEATURES, "TYPE_FP32", (-1, facts.audio.num_mel_bins, clip_width)),
                         Tensor(AUDIO_FRAMES, "TYPE_INT64", (-1,))), Tensor(AUDIO_EMBEDS, "TYPE_FP32", (-1, hidden))))
    media_outputs = [per_request(t) for _, _, inputs, _ in encoders for t in inputs]
    # A decoder with M-RoPE takes the prompt's [3, S] positions, which only preprocess can compute (image sizes).
    positions = [Tensor(PROMPT_POSITIONS, "TYPE_INT64", (facts.position_rows, -1))] if facts.position_rows != 1 else []
    models: list[ModelPlan] = [
        ModelPlan(
            "preprocess", "python_model.pbtxt.j2",
            inputs=(TEXT_INPUT, *MEDIA_INPUTS),
            outputs=(Tensor(INPUT_IDS, "TYPE_INT64", (-1,)), *positions, *media_outputs, PROMPT_TOKENS_OUTPUT),
            python_model="preprocess", files=dict(shared),
            parameters=RequestLimits.from_spec(lim).parameters(),  # read back by RequestLimits.from_parameters
            **per_model,
        ),
    ]
    for name, graph, inputs, output in encoders:
        parameters = {"output": output.name}
        if target.batches_encoders:  # Triton's own backend runs (and batches) the graph behind a gate
            models.append(ModelPlan(
                name, "python_model.pbtxt.j2", inputs=tuple(map(per_request, inputs)), outputs=(per_request(output),),
                python_model="engine_gate", files=facts_file,
                parameters={**parameters, "engine_model": target.engine_model_name(name),
                            "graph_inputs": ",".join(sig.name for sig in graph.graph.inputs)},
                **per_model,
            ))
            models.append(_engine_model(spec, graph))
        else:  # the Python model runs the graph on the media of every request Triton batched together
            models.append(ModelPlan(
                name, "python_model.pbtxt.j2", inputs=tuple(dataclasses.replace(t, ragged=True) for t in inputs),
                outputs=(output,), python_model="encoder", files={"model.onnx": graph.path, **facts_file}, parameters=parameters,
                max_batch_size=triton.max_batch_size, dynamic_batching=triton.dynamic_batching,
                max_queue_delay_us=triton.max_queue_delay_us, **per_model,
            ))
    embeds_inputs = [dataclasses.replace(per_request(out), optional=True) for _, _, _, out in encoders]
    models.append(ModelPlan(
        "fuse", "python_model.pbtxt.j2",
        inputs=(Tensor(INPUT_IDS, "TYPE_INT64", (-1,)), *embeds_inputs),
        outputs=(Tensor(MULTIMODAL_EMBEDS, "TYPE_FP32", (-1, hidden)), Tensor(MULTIMODAL_MASK, "TYPE_BOOL", (-1,))),
        python_model="fuse", files=facts_file, **per_model,
    ))
    llm_inputs = (
        Tensor(INPUT_IDS, "TYPE_INT64", (-1,)),
        Tensor(MULTIMODAL_EMBEDS, "TYPE_FP32", (-1, hidden)),
        Tensor(MULTIMODAL_MASK, "TYPE_BOOL", (-1,)),
        *positions,
        *SAMPLING_INPUTS,
    )
    # One model holds the LLM's weights: `llm`. The entry points are Python models holding no weights that run
    # the steps below with plain BLS calls, the last one as a session on `llm` that they poll
    # (mmtb_runtime.sessions). Its prompt inputs are optional on `llm` because a poll carries only the session.
    models.append(ModelPlan(
        DECODE_MODEL, "python_model.pbtxt.j2",
        inputs=(*(dataclasses.replace(t, optional=True) for t in llm_inputs[:3 + len(positions)]),
                *llm_inputs[3 + len(positions):], SESSION_INPUT, CANCEL_INPUT),
        outputs=(*ANSWER_OUTPUTS, FINISHED_OUTPUT), python_model=DECODE_MODEL,
        files={**compiled[LLM.name].files, **facts_file, "tokenizer.json": shared["tokenizer.json"]},
        parameters={
            "max_tokens": str(lim.max_tokens), "default_max_tokens": str(lim.default_max_tokens),
            "max_context": str(lim.max_context), "max_decode_batch": str(triton.max_batch_size),
            "prefix_cache_bytes": str(triton.prefix_cache_mb << 20),
            "kv_budget_tokens": str(triton.kv_budget_tokens or triton.max_batch_size * lim.max_context),
            "kv_queue_timeout_s": str(triton.kv_queue_timeout_s), "stream_interval_ms": str(triton.stream_interval_ms),
            **_llm_runner(compiled[LLM.name]),
        },
        serves=compiled[LLM.name], adds_batch_axis=True, **per_model,
    ))

    front_outputs = {INPUT_IDS: "_input_ids", **{t.name: f"_{t.name}" for t in (*positions, *media_outputs)},
                     PROMPT_TOKENS_OUTPUT.name: PROMPT_TOKENS_OUTPUT.name}  # straight to the client
    front = [EnsembleStep("preprocess", {t.name: t.name for t in (TEXT_INPUT, *MEDIA_INPUTS)}, front_outputs)]
    for name, _, inputs, output in encoders:
        front.append(EnsembleStep(name, {t.name: f"_{t.name}" for t in inputs}, {output.name: f"_{output.name}"}))
    front.append(EnsembleStep("fuse", {INPUT_IDS: "_input_ids", **{t.name: f"_{t.name}" for t in embeds_inputs}},
                              {MULTIMODAL_EMBEDS: "_multimodal_embeds", MULTIMODAL_MASK: "_multimodal_mask"}))
    decode_inputs = {INPUT_IDS: "_input_ids", MULTIMODAL_EMBEDS: "_multimodal_embeds",
                     MULTIMODAL_MASK: "_multimodal_mask", **{t.name: f"_{t.name}" for t in positions},
                     **{t.name: t.name for t in SAMPLING_INPUTS}}
    answer = {t.name: t.name for t in ANSWER_OUTPUTS}
    # Python models, not Triton ensembles: Triton 2.51 does not pass a client's cancellation (or a gRPC deadline) on to an
    # ensemble step already running, so only the model the client called can see it (request.is_cancelled()). A unary
    # infer on a decoupled model is refused: two entry points. `execute` blocks for the request it serves: one instance
    # per sequence of a full decode batch.
    entry = {"python_model": "entry_point", "steps": (*front, EnsembleStep(DECODE_MODEL, decode_inputs, answer)),
             "instances": triton.max_batch_size * triton.instances}
    if triton.entry_points != "streaming":
        models.append(ModelPlan(UNARY_ENSEMBLE, "python_model.pbtxt.j2", inputs=CLIENT_INPUTS, outputs=CLIENT_OUTPUTS, **entry))
    if triton.entry_points != "unary":
        models.append(ModelPlan(STREAMING_ENSEMBLE, "python_model.pbtxt.j2", inputs=(*CLIENT_INPUTS, STREAM_INPUT),
                                outputs=CLIENT_OUTPUTS, decoupled=True, **entry))
    return models


def _engine_model(spec: BuildSpec, compiled: CompiledModel) -> ModelPlan:
    """An encoder's graph or plans under Triton's own backend, batched across requests on the graph's first axis."""
    triton, graph, target = spec.triton, compiled.graph, TARGETS[spec.target]
    assert target.engine_template is not None
    return ModelPlan(
        target.engine_model_name(compiled.component), target.engine_template,
        inputs=tuple(Tensor(sig.name, sig.data_type, sig.dims[1:]) for sig in graph.inputs),
        outputs=tuple(Tensor(sig.name, sig.data_type, sig.dims[1:]) for sig in graph.outputs),
        files=_backend_files(spec, compiled), max_batch_size=triton.max_batch_size, instances=triton.instances,
        dynamic_batching=triton.dynamic_batching, max_queue_delay_us=triton.max_queue_delay_us,
        serves=compiled, template_options=target.engine_options(compiled, triton),
    )


def _backend_files(spec: BuildSpec, compiled: CompiledModel) -> dict[str, Path]:
    """Triton's ONNX Runtime backend finds a graph's external weights only when ``model.onnx`` is a
    directory holding the graph and its data; a graph in one file stays a file."""
    if TARGETS[spec.target].onnx_as_directory and data_files(compiled.path):
        return {"model.onnx/model.onnx": compiled.path}
    return compiled.files


def _llm_runner(compiled: CompiledModel) -> dict[str, str]:
    """Target tensorrt: the decode model drives the plan built for the GPU it runs on."""
    if not compiled.plans:
        return {}
    return {"runner": "tensorrt", "plans": ";".join(f"{p.compute_capability}={p.file}" for p in compiled.plans)}


def per_request(tensor: Tensor) -> Tensor:
    """An encoder tensor as one request carries it between models: a leading axis of 1."""
    return dataclasses.replace(tensor, dims=(1, *tensor.dims))
