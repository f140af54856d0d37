"""The seams of a target: its backends refuse what they cannot serve before any export, contribute their own
Triton models, and the entry points are wired from the models' declared inputs and outputs alone."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from builder.compile.artifacts import CompiledModel
from builder.errors import BuildError
from builder.export.graph import ExportedGraph, ParityResult, graph_signature
from builder.repository.assemble import assemble_repository
from builder.repository.plan import Contribution, ModelPlan, Tensor, decode_model, plan_repository, wire
from builder.runtime.contract import DECODE_MODEL, STREAMING_ENSEMBLE, UNARY_ENSEMBLE
from builder.runtime.model_facts import ModelFacts
from builder.spec import BuildSpec
from builder.targets import TARGETS
from builder.targets.onnx_llm import OnnxRuntimeLlm

ids = Tensor("ids", "TYPE_INT64", (-1,))
text = Tensor("text", "TYPE_STRING", (1,))
answer = Tensor("answer", "TYPE_STRING", (-1,))


def model(name: str, inputs: tuple[Tensor, ...], outputs: tuple[Tensor, ...]) -> ModelPlan:
    return ModelPlan(name, "python_model.pbtxt.j2", inputs=inputs, outputs=outputs)


def test_steps_are_wired_by_tensor_name() -> None:
    unread = Tensor("debug", "TYPE_FP32", (-1,))
    hint = Tensor("hint", "TYPE_FP32", (-1,), optional=True)  # optional, produced by nobody: left out
    steps = wire([model("front", (text,), (ids, unread)), model("decode", (ids, hint), (answer,))], (text,), (answer,))
    assert [(s.model, s.inputs, s.outputs) for s in steps] == [
        ("front", {"text": "text"}, {"ids": "_ids"}),  # nothing reads `debug`: not an ensemble tensor
        ("decode", {"ids": "_ids"}, {"answer": "answer"}),
    ]
    with pytest.raises(BuildError, match="decode: input ids is neither a client input nor an earlier step's output"):
        wire([model("decode", (ids,), (answer,))], (text,), (answer,))


def _compiled(built: Path) -> dict[str, CompiledModel]:
    compiled = {}
    for component in ("vision_encoder", "audio_encoder", "llm"):
        path = built / component / "1" / "model.onnx"
        graph = ExportedGraph(component, path, *graph_signature(path), ParityResult(1, 0.0, 1.0, 1e-4, 1e-3))
        compiled[component] = CompiledModel(component, path, "fp32", graph)
    return compiled


class WithDetokenizer(OnnxRuntimeLlm):
    """An LLM backend that contributes a second model beside its decode step (as a TensorRT-LLM backend would its
    engine): it must appear in the repository, and the entry points must still end at the decode step."""

    def models(self, compiled: CompiledModel, inputs: tuple[Tensor, ...], spec: BuildSpec,
               files: dict[str, Path]) -> Contribution:
        helper = model("detokenizer", (ids,), (answer,))
        return Contribution(decode_model(compiled, inputs, spec, files, runner={}), (helper,))


def test_a_backend_contributes_its_models_and_the_entry_points_follow(tiny_spec, built_repository, tmp_path) -> None:
    shared = {name: built_repository / "preprocess" / "1" / name for name in ("model_facts.json", "tokenizer.json")}
    facts = ModelFacts.load(shared["model_facts.json"])
    target = TARGETS["python"]
    plans = plan_repository(tiny_spec, facts, _compiled(built_repository), shared, target.encoders, WithDetokenizer())
    names = [p.name for p in plans]
    assert names.index("detokenizer") == names.index(DECODE_MODEL) + 1
    ensemble = next(p for p in plans if p.name == UNARY_ENSEMBLE)
    assert [s.model for s in ensemble.steps] == ["preprocess", "vision_encoder", "audio_encoder", "fuse", DECODE_MODEL]
    assemble_repository(plans, tmp_path / "repo", {})  # renders and validates every config, the ensemble's wiring too
    steps = json.loads((tmp_path / "repo" / STREAMING_ENSEMBLE / "1" / "steps.json").read_text())
    assert [s["model"] for s in steps] == [s.model for s in ensemble.steps]


def test_targets_refuse_a_model_they_cannot_serve_with_one_reason_each(built_repository) -> None:
    """An M-RoPE decoder with Qwen-VL image patches (Qwen2.5-Omni, Qwen2.5-VL): asked before any export."""
    facts = ModelFacts.load(built_repository / "preprocess" / "1" / "model_facts.json")
    assert facts.image is not None
    qwen_like = dataclasses.replace(facts, position_rows=3, image=dataclasses.replace(facts.image, layout="qwen_vl"))
    components = ["vision_encoder", "llm"]
    assert TARGETS["python"].check_model(components, qwen_like) == []
    assert TARGETS["onnxruntime"].check_model(components, qwen_like) == [
        "target onnxruntime: vision_encoder of this model cannot run batched in Triton's own backend; build for target python"]
    reasons = TARGETS["tensorrt"].check_model(components, qwen_like)
    assert len(reasons) == 2 and "M-RoPE" in reasons[1]
    assert all(t.check_model(components, facts) == [] for t in TARGETS.values())  # the preset: every target
