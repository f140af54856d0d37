"""Which models the repository holds, their tensors and how the ensembles wire them.

Python decides here; the config text lives in ``templates/``. The plan is plain data that
:mod:`builder.repository.assemble` renders and :mod:`builder.repository.validate` checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from builder.compile.artifacts import CompiledModel
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
    encoders = [
        ("vision_encoder", "pixel_values", (-1, 3, size, size), "image_embeds"),
        ("audio_encoder", "input_features", (-1, facts.num_mel_bins, frames), "audio_embeds"),
    ]
    for name, in_name, in_dims, out_name in encoders:
        graph = compiled.get(name)
        models.append(ModelPlan(
            name, "python_model.pbtxt.j2",
            inputs=(Tensor(in_name, "TYPE_FP32", in_dims),),
            outputs=(Tensor(out_name, "TYPE_FP32", (-1, -1, hidden)),),
            python_model="encoder",
            files={"model.onnx": graph.path} if graph else {},
            parameters={"input": in_name, "output": out_name, "hidden_size": str(hidden)},
            serves=graph, **per_model,
        ))
    models.append(ModelPlan(
        "fuse", "python_model.pbtxt.j2",
        inputs=(
            Tensor("input_ids", "TYPE_INT64", (-1,)),
            Tensor("image_embeds", "TYPE_FP32", (-1, -1, hidden)),
            Tensor("audio_embeds", "TYPE_FP32", (-1, -1, hidden)),
        ),
        outputs=(Tensor("multimodal_embeds", "TYPE_FP32", (-1, hidden)), Tensor("multimodal_mask", "TYPE_BOOL", (-1,))),
        python_model="fuse", files=facts_file, **per_model,
    ))
    llm_inputs = (
        Tensor("input_ids", "TYPE_INT64", (-1,)),
        Tensor("multimodal_embeds", "TYPE_FP32", (-1, hidden)),
        Tensor("multimodal_mask", "TYPE_BOOL", (-1,)),
        *SAMPLING_INPUTS,
        STREAM_INPUT,
    )
    models.append(ModelPlan(
        "llm", "python_model.pbtxt.j2", inputs=llm_inputs, outputs=ANSWER_OUTPUTS, python_model="llm",
        files={"model.onnx": compiled["llm"].path, **facts_file, "tokenizer.json": shared["tokenizer.json"]},
        parameters={
            "max_tokens": str(lim.max_tokens), "default_max_tokens": str(lim.default_max_tokens),
            "max_context": str(lim.max_context),
        },
        decoupled=True, serves=compiled["llm"], adds_batch_axis=True, **per_model,
    ))
    # A unary infer on a decoupled ensemble is refused, so unary clients get their own entry point;
    # `generate` collects the `llm` stream, so both share one copy of the LLM weights.
    models.append(ModelPlan(
        "generate", "python_model.pbtxt.j2", inputs=llm_inputs[:-1], outputs=ANSWER_OUTPUTS,
        python_model="generate", parameters={"llm_model": "llm"}, **per_model,
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
    models.append(ModelPlan(
        "ensemble", "ensemble.pbtxt.j2", inputs=client_inputs, outputs=ANSWER_OUTPUTS,
        steps=(*front, EnsembleStep("generate", decode_inputs, answer)),
    ))
    models.append(ModelPlan(
        "ensemble_stream", "ensemble.pbtxt.j2", inputs=(*client_inputs, STREAM_INPUT), outputs=ANSWER_OUTPUTS,
        steps=(*front, EnsembleStep("llm", {**decode_inputs, "stream": "stream"}, answer)), decoupled=True,
    ))
    return models
