"""Which models the repository holds, their tensors and how the ensembles wire them.

Python decides here; the config text lives in ``templates/``. The plan is plain data that
:mod:`builder.repository.assemble` renders and :mod:`builder.repository.validate` checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.compile.artifacts import CompiledModel, engine_model_name
from builder.runtime.model_facts import ModelFacts
from builder.spec import BuildSpec


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False


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
    steps: tuple[EnsembleStep, ...] = ()
    serves: CompiledModel | None = None  # the graph whose signature the config must match
    adds_batch_axis: bool = False  # the model feeds one request as a batch of 1 (the decode loop)
    template_options: dict[str, Any] = field(default_factory=dict)  # what only its template uses


SAMPLING_INPUTS = (
    Tensor("max_tokens", "TYPE_INT32", (1,), optional=True),
    Tensor("temperature", "TYPE_FP32", (1,), optional=True),
    Tensor("top_k", "TYPE_INT32", (1,), optional=True),
    Tensor("top_p", "TYPE_FP32", (1,), optional=True),
    Tensor("seed", "TYPE_UINT64", (1,), optional=True),
)
# Required, but declared optional: Triton 2.51 answers a request without it only with "unexpected
# deadlock" in the ensemble; `preprocess` sees None and says "text_input: required input is missing".
TEXT_INPUT = Tensor("text_input", "TYPE_STRING", (1,), optional=True)
STREAM_INPUT = Tensor("stream", "TYPE_BOOL", (1,), optional=True)
ANSWER_OUTPUTS = (Tensor("text_output", "TYPE_STRING", (-1,)), Tensor("output_ids", "TYPE_INT64", (-1,)))


def plan_repository(spec: BuildSpec, facts: ModelFacts, compiled: dict[str, CompiledModel], shared: dict[str, Path]) -> list[ModelPlan]:
    """``compiled`` maps component -> compiled graph; ``shared`` the files every Python model may need
    (``model_facts.json``, ``tokenizer.json``)."""
    lim, triton = spec.limits, spec.triton
    hidden = facts.hidden_size
    size = facts.image_size
    frames = facts.clip_samples // 160
    per_model = dict(instances=triton.instances)
    facts_file = {"model_facts.json": shared["model_facts.json"]}

    models: list[ModelPlan] = [
        ModelPlan(
            "preprocess", "python_model.pbtxt.j2",
            inputs=(
                TEXT_INPUT,
                Tensor("image", "TYPE_STRING", (-1,), optional=True),
                Tensor("audio", "TYPE_STRING", (-1,), optional=True),
            ),
            outputs=(
                Tensor("input_ids", "TYPE_INT64", (-1,)),
                Tensor("pixel_values", "TYPE_FP32", (-1, 3, size, size)),
                Tensor("input_features", "TYPE_FP32", (-1, max(facts.num_mel_bins, 1), max(frames, 1))),
            ),
            python_model="preprocess", files={**facts_file, "tokenizer.json": shared["tokenizer.json"]},
            parameters={
                "max_images": str(lim.max_images), "max_image_bytes": str(lim.max_image_bytes),
                "max_image_pixels": str(lim.max_image_pixels), "max_audio_clips": str(lim.max_audio_clips),
                "max_audio_bytes": str(lim.max_audio_bytes), "max_prompt_tokens": str(lim.max_prompt_tokens),
                "vision_enabled": str(spec.components.vision.enabled).lower(),
                "audio_enabled": str("audio_encoder" in compiled).lower(),
            },
            **per_model,
        ),
    ]
    image_tokens = facts.image_grid[0] * facts.image_grid[1]
    encoders = [
        ("vision_encoder", "pixel_values", (-1, 3, size, size), "image_embeds", image_tokens),
        ("audio_encoder", "input_features", (-1, facts.num_mel_bins, frames), "audio_embeds", facts.audio_tokens_per_clip),
    ]
    for name, in_name, in_dims, out_name, tokens in encoders:
        graph = compiled.get(name)
        native = graph is not None and spec.target != "python"  # Triton's own backend runs the graph
        models.append(ModelPlan(
            name, "python_model.pbtxt.j2",
            inputs=(Tensor(in_name, "TYPE_FP32", in_dims),),
            outputs=(Tensor(out_name, "TYPE_FP32", (-1, max(tokens, 1), hidden)),),
            python_model="engine_gate" if native else "encoder",
            files={"model.onnx": graph.path} if graph and not native else {},
            parameters={"input": in_name, "output": out_name, "tokens": str(max(tokens, 1)), "hidden_size": str(hidden),
                        **({"engine_model": engine_model_name(name, spec.target)} if native else {})},
            serves=None if native else graph, **per_model,
        ))
        if native:
            models.append(_engine_model(spec, graph))
    models.append(ModelPlan(
        "fuse", "python_model.pbtxt.j2",
        inputs=(
            Tensor("input_ids", "TYPE_INT64", (-1,)),
            Tensor("image_embeds", "TYPE_FP32", (-1, image_tokens, hidden)),
            Tensor("audio_embeds", "TYPE_FP32", (-1, max(facts.audio_tokens_per_clip, 1), hidden)),
        ),
        outputs=(Tensor("multimodal_embeds", "TYPE_FP32", (-1, hidden)), Tensor("multimodal_mask", "TYPE_BOOL", (-1,))),
        python_model="fuse", files=facts_file, **per_model,
    ))
    llm_inputs = (
        Tensor("input_ids", "TYPE_INT64", (-1,)),
        Tensor("multimodal_embeds", "TYPE_FP32", (-1, hidden)),
        Tensor("multimodal_mask", "TYPE_BOOL", (-1,)),
        *SAMPLING_INPUTS,
    )
    # A unary infer on a decoupled ensemble is refused, so unary and streaming clients get a decode
    # model each, from the same model.py. One model collecting the other's stream through BLS saved
    # the second copy of the weights, but crashed the calling stub under sustained load (a Python
    # backend BLS bug, still open upstream), so each process holds its own copy of the LLM;
    # `triton.entry_points` builds just one of them.
    decode_models = {"unary": [("llm", False)], "streaming": [("llm_stream", True)]}
    wanted = decode_models.get(triton.entry_points, decode_models["unary"] + decode_models["streaming"])
    for name, decoupled in wanted:
        models.append(ModelPlan(
            name, "python_model.pbtxt.j2", inputs=(*llm_inputs, STREAM_INPUT) if decoupled else llm_inputs,
            outputs=ANSWER_OUTPUTS, python_model="llm",
            files={**compiled["llm"].files, **facts_file, "tokenizer.json": shared["tokenizer.json"]},
            parameters={
                "max_tokens": str(lim.max_tokens), "default_max_tokens": str(lim.default_max_tokens),
                "max_context": str(lim.max_context), "max_decode_batch": str(triton.max_batch_size),
                **_llm_runner(compiled["llm"]),
            },
            decoupled=decoupled, serves=compiled["llm"], adds_batch_axis=True, **per_model,
        ))

    client_inputs = (
        TEXT_INPUT,
        Tensor("image", "TYPE_STRING", (-1,), optional=True),
        Tensor("audio", "TYPE_STRING", (-1,), optional=True),
        *SAMPLING_INPUTS,
    )
    front = (
        EnsembleStep("preprocess", {"text_input": "text_input", "image": "image", "audio": "audio"},
                     {"input_ids": "_input_ids", "pixel_values": "_pixel_values", "input_features": "_input_features"}),
        EnsembleStep("vision_encoder", {"pixel_values": "_pixel_values"}, {"image_embeds": "_image_embeds"}),
        EnsembleStep("audio_encoder", {"input_features": "_input_features"}, {"audio_embeds": "_audio_embeds"}),
        EnsembleStep("fuse", {"input_ids": "_input_ids", "image_embeds": "_image_embeds", "audio_embeds": "_audio_embeds"},
                     {"multimodal_embeds": "_multimodal_embeds", "multimodal_mask": "_multimodal_mask"}),
    )
    decode_inputs = {"input_ids": "_input_ids", "multimodal_embeds": "_multimodal_embeds",
                     "multimodal_mask": "_multimodal_mask", **{t.name: t.name for t in SAMPLING_INPUTS}}
    answer = {t.name: t.name for t in ANSWER_OUTPUTS}
    if triton.entry_points != "streaming":
        models.append(ModelPlan(
            "ensemble", "ensemble.pbtxt.j2", inputs=client_inputs, outputs=ANSWER_OUTPUTS,
            steps=(*front, EnsembleStep("llm", decode_inputs, answer)),
        ))
    if triton.entry_points != "unary":
        models.append(ModelPlan(
            "ensemble_stream", "ensemble.pbtxt.j2", inputs=(*client_inputs, STREAM_INPUT), outputs=ANSWER_OUTPUTS,
            steps=(*front, EnsembleStep("llm_stream", {**decode_inputs, "stream": "stream"}, answer)), decoupled=True,
        ))
    return models


_ENGINE_TEMPLATES = {"onnxruntime": "onnxruntime_model.pbtxt.j2", "tensorrt": "tensorrt_model.pbtxt.j2"}


def _engine_model(spec: BuildSpec, compiled: CompiledModel) -> ModelPlan:
    """An encoder's graph or plans under Triton's own backend, batched across requests on the graph's first axis."""
    triton, graph = spec.triton, compiled.graph
    options: dict[str, Any] = (
        {"default_model_filename": compiled.path.name, "cc_model_filenames": compiled.cc_model_filenames}
        if spec.target == "tensorrt" else {"tensorrt_accelerator": triton.ort_tensorrt_accelerator}
    )
    return ModelPlan(
        engine_model_name(compiled.component, spec.target), _ENGINE_TEMPLATES[spec.target],
        inputs=tuple(Tensor(sig.name, sig.data_type, sig.dims[1:]) for sig in graph.inputs),
        outputs=tuple(Tensor(sig.name, sig.data_type, sig.dims[1:]) for sig in graph.outputs),
        files=compiled.files, max_batch_size=triton.max_batch_size, instances=triton.instances,
        dynamic_batching=triton.dynamic_batching, max_queue_delay_us=triton.max_queue_delay_us,
        serves=compiled, template_options=options,
    )


def _llm_runner(compiled: CompiledModel) -> dict[str, str]:
    """Target tensorrt: the decode model drives the plan built for the GPU it runs on."""
    if not compiled.plans:
        return {}
    return {"runner": "tensorrt", "plans": ";".join(f"{p.compute_capability}={p.file}" for p in compiled.plans)}
