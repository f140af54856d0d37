"""Targets onnxruntime and tensorrt on a machine without a GPU: configs that validate, a clean refusal.

The CPU-only tritonserver here has only the Python backend, so these repositories are checked by
parsing every config as Triton's ModelConfig and checking it against its graph, not by serving them.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from builder.build import build
from builder.compile.artifacts import CompiledModel
from builder.compare import GateResult, OutputFigures
from builder.compile.plans import Device, plan_record
from builder.errors import BuildError
from builder.onnx_files import load_onnx
from builder.export.graph import ExportedGraph, ParityResult, graph_signature
from builder.repository.assemble import assemble_repository
from builder.repository.plan import plan_repository
from builder.repository.validate import check_graph_signature
from builder.runtime.gpu import query_gpu
from builder.runtime.model_facts import ModelFacts
from builder.targets.tensorrt import TENSORRT
from tests.conftest import CACHE, ROOT

ENCODERS = ("vision_encoder", "audio_encoder")


def configs(repository: Path) -> dict[str, model_config_pb2.ModelConfig]:
    parsed = {}
    for path in sorted(repository.glob("*/config.pbtxt")):
        parsed[path.parent.name] = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return parsed


def test_onnxruntime_target_renders_configs_for_tritons_ort_backend(tiny_spec, tmp_path):
    spec = dataclasses.replace(tiny_spec, target="onnxruntime")
    build(spec, tmp_path / "repo", CACHE, progress=False)
    parsed = configs(tmp_path / "repo")
    for name in ENCODERS:
        engine = parsed[f"{name}_onnxruntime"]
        assert engine.backend == "onnxruntime" and engine.max_batch_size == spec.triton.max_batch_size
        assert engine.HasField("dynamic_batching") and not engine.HasField("optimization")
        assert (tmp_path / "repo" / f"{name}_onnxruntime" / "1" / "model.onnx").is_file()
        gate = parsed[name]
        assert gate.backend == "python" and gate.parameters["engine_model"].string_value == f"{name}_onnxruntime"
    assert parsed["llm"].backend == "python"  # the decode loop stays a Python model running ORT


def test_ort_tensorrt_accelerator_is_selectable(tiny_spec, tmp_path):
    spec = dataclasses.replace(tiny_spec, target="onnxruntime",
                               onnxruntime=dataclasses.replace(tiny_spec.onnxruntime, tensorrt_accelerator=True))
    build(spec, tmp_path / "repo", CACHE, progress=False)
    engine = configs(tmp_path / "repo")["vision_encoder_onnxruntime"]
    (accelerator,) = engine.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"


def test_make_engines_target_tensorrt_fails_cleanly_without_a_gpu(tmp_path):
    if query_gpu() is not None:
        pytest.skip("a GPU is present")
    done = subprocess.run([sys.executable, "-m", "builder", "build", "--target", "tensorrt", "--output", str(tmp_path / "r")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and not (tmp_path / "r").exists()
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "targets that work on this machine: python, onnxruntime" in lines[0], done.stderr


def _tensorrt_compiled(built: Path, tmp_path: Path) -> dict[str, CompiledModel]:
    """What the compile stage hands over after builds on two GPU architectures (fake plan bytes)."""
    devices = [Device("NVIDIA L4", "8.9", "550.54", "10.8.0"), Device("NVIDIA A10", "8.6", "550.54", "10.8.0")]
    compiled = {}
    for component in (*ENCODERS, "llm"):
        onnx_path = built / component / "1" / "model.onnx"
        inputs, outputs = graph_signature(onnx_path)
        graph = ExportedGraph(component, onnx_path, inputs, outputs, ParityResult(1, 0.0, 1.0, 1e-4, 1e-3))
        plans = []
        for device in devices:
            path = tmp_path / component / device.plan_file
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(b"plan")
            plans.append(plan_record(device, "sha", GateResult(2, (OutputFigures("out", 0.999, 1e-3, 1e-4),), ()), path))
        compiled[component] = CompiledModel(component, plans[0].path, "fp32", graph, tuple(plans))
    return compiled


def test_tensorrt_target_configs_with_plans_for_two_architectures(tiny_spec, built_repository, tmp_path):
    spec = dataclasses.replace(tiny_spec, target="tensorrt")
    shared = {name: built_repository / "llm" / "1" / name for name in ("model_facts.json", "tokenizer.json")}
    facts = ModelFacts.load(shared["model_facts.json"])
    plans = plan_repository(spec, facts, _tensorrt_compiled(built_repository, tmp_path), shared, TENSORRT.encoders, TENSORRT.llm)
    assemble_repository(plans, tmp_path / "repo", {})
    parsed = configs(tmp_path / "repo")
    for name in ENCODERS:
        engine = parsed[f"{name}_tensorrt"]
        assert engine.platform == "tensorrt_plan" and engine.max_batch_size == spec.triton.max_batch_size
        assert engine.default_model_filename == "model_sm89.plan"
        assert dict(engine.cc_model_filenames) == {"8.9": "model_sm89.plan", "8.6": "model_sm86.plan"}
        assert sorted(p.name for p in (tmp_path / "repo" / f"{name}_tensorrt" / "1").iterdir()) == [
            "model_sm86.plan", "model_sm89.plan"]
    llm = parsed["llm"]
    assert llm.backend == "python" and llm.parameters["runner"].string_value == "tensorrt"
    assert llm.parameters["plans"].string_value == "8.9=model_sm89.plan;8.6=model_sm86.plan"
    assert not (tmp_path / "repo" / "llm" / "1" / "model.onnx").exists()


def test_native_configs_must_match_the_graph_exactly(tiny_spec, built_repository, tmp_path):
    spec = dataclasses.replace(tiny_spec, target="tensorrt")
    shared = {name: built_repository / "llm" / "1" / name for name in ("model_facts.json", "tokenizer.json")}
    plans = plan_repository(spec, ModelFacts.load(shared["model_facts.json"]),
                            _tensorrt_compiled(built_repository, tmp_path), shared, TENSORRT.encoders, TENSORRT.llm)
    engine = next(p for p in plans if p.name == "vision_encoder_tensorrt")
    check_graph_signature(engine)
    wrong_dims = dataclasses.replace(engine, inputs=(dataclasses.replace(engine.inputs[0], dims=(4, -1, -1)),))
    with pytest.raises(BuildError, match="disagree with the graph's"):
        check_graph_signature(wrong_dims)
    with pytest.raises(BuildError, match="config inputs .* differ from the graph's"):
        check_graph_signature(dataclasses.replace(engine, inputs=()))
    graph = engine.serves.graph
    fixed_batch = dataclasses.replace(graph, inputs=(dataclasses.replace(graph.inputs[0], dims=(2, 3, 64, 64)),))
    with pytest.raises(BuildError, match="needs a dynamic first \\(batch\\) axis"):
        check_graph_signature(dataclasses.replace(engine, serves=dataclasses.replace(engine.serves, graph=fixed_batch)))


def test_tensorrt_runner_bookkeeping_on_a_fake_device(built_repository, appended_llm, monkeypatch, tmp_path):
    """The TensorRT runner's cache copies, padding and buffer swaps, with numpy standing in for the GPU
    and ONNX Runtime for the plan (tests/fake_tensorrt.py, the exported graph TensorRT compiles): the same tokens as
    LanguageModelRunner on the repository's in-place graph, alone and continuously batched. Not a GPU test: TensorRT itself and real CUDA calls run only in make gpu-smoke."""
    import importlib

    import numpy as np
    import polygraphy

    from builder.runtime.generation import LanguageModelRunner, SamplingParams
    from tests import fake_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.tensorrt_module(max_batch=4))
    monkeypatch.setitem(sys.modules, "polygraphy.cuda", fake_tensorrt.cuda)
    monkeypatch.setattr(polygraphy, "cuda", fake_tensorrt.cuda, raising=False)
    sys.modules.pop("builder.runtime.trt_generation", None)
    trt_generation = importlib.import_module("builder.runtime.trt_generation")
    sys.modules.pop("builder.runtime.trt_generation")  # later imports get the real one, not this faked one

    directory = built_repository / "llm" / "1"
    facts = ModelFacts.load(directory / "model_facts.json")
    reference = LanguageModelRunner(str(directory / "model.onnx"), facts)
    plan = tmp_path / "model.onnx"  # the fake plan is the graph's bytes: its weights inside, not beside it
    onnx.save(load_onnx(appended_llm), str(plan))
    runner = trt_generation.TensorRTLanguageModelRunner(plan, facts, max_context=256)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(16, 272, n).astype(np.int64) for n in (5, 31, 12, 60, 2, 19)]

    def inputs(ids):
        return ids, np.zeros((ids.size, facts.hidden_size), np.float32), np.zeros(ids.size, bool)

    alone = [list(reference.generate(*inputs(p), SamplingParams(16))) for p in prompts]
    assert [list(runner.generate(*inputs(p), SamplingParams(16))) for p in prompts] == alone
    sampled = SamplingParams(10, temperature=0.8, top_k=20, seed=3)
    assert list(runner.generate(*inputs(prompts[1]), sampled)) == list(reference.generate(*inputs(prompts[1]), sampled))

    sequences = [runner.start(*inputs(p), SamplingParams(16)) for p in prompts]
    together = [[seq.next_token()] for seq in sequences]
    step = 0
    while waiting := [(out, seq) for out, seq in zip(together, sequences) if not seq.finished]:
        step += 1  # batches of up to 4 in turn: the composition changes every step, then a steady tail
        batch = waiting[:4] if step % 2 or len(waiting) <= 4 else waiting[-4:]
        runner.decode([seq for _, seq in batch])
        for out, seq in batch:
            out.append(seq.next_token())
    assert together == alone


def test_the_registry_is_what_the_spec_and_cli_offer(tmp_path: Path) -> None:
    """Every target names only things that exist: its engine template, its INT8 layout, its own spec section;
    the CLI's --target choices and the spec's errors are read from the registry."""
    from builder.cli import parser
    from builder.quantize.qdq import LAYOUTS
    from builder.repository.render import TEMPLATES
    from builder.spec import BuildSpec, load_spec
    from builder.targets import TARGETS, target_for
    from builder.targets.engine_encoders import EngineEncoders

    for target in TARGETS.values():
        encoders = target.encoders
        assert not isinstance(encoders, EngineEncoders) or (TEMPLATES / encoders.template).is_file(), target.name
        assert LAYOUTS[encoders.qdq_layout.name] is encoders.qdq_layout
        assert target.settings is None or dataclasses.is_dataclass(getattr(BuildSpec(), target.settings)), target.name
    build_parser = parser()._subparsers._group_actions[0].choices["build"]  # noqa: SLF001 - argparse keeps them there
    (target_option,) = [a for a in build_parser._actions if a.dest == "target"]  # noqa: SLF001
    assert list(target_option.choices) == list(TARGETS)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("target: openvino\n")
    with pytest.raises(BuildError, match="target: 'openvino' is not one of " + ", ".join(TARGETS)):
        target_for(load_spec(spec_file))
    with pytest.raises(BuildError, match="onnxruntime.tensorrt_accelerator: applies to target onnxruntime only"):
        target_for(load_spec(spec_file, {"target": "python", "onnxruntime.tensorrt_accelerator": True}))
    with pytest.raises(BuildError, match="tensorrt.comparison_samples: applies to target tensorrt only"):
        target_for(load_spec(spec_file, {"target": "onnxruntime", "tensorrt.comparison_samples": 3}))
