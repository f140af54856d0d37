"""The quantize stage: calibration data, the gate and its fallback ladder, FP16, INT8 end-to-end agreement."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
import pytest

from builder.build import build
from builder.compare import onnxruntime_session
from builder.errors import BuildError, SpecError
from builder.quantize.agreement import POSITIONS, FusedPrompt, RunnerScorer, fuse_prompt, score_all
from builder.quantize.awq import search_scales
from builder.quantize.calibration_data import calibration_files, fixed_continuations, load_samples, server_preprocessor
from builder.cache import StageCache
from builder.quantize.ladder import LlmJob, LlmSource, qdq_weight_rungs, settle_llm
from builder.quantize.reference import TorchScorer
from builder.quantize.pipeline import PipelineFigures, PipelineGate, held_out_requests
from builder.runtime.model_facts import ModelFacts
from builder.source.resolve import resolve_source
from builder.spec import BuildSpec, load_spec, parse_spec
from builder.targets import TARGETS
from builder.onnx_files import load_onnx
from tests.conftest import CACHE, ROOT

INT8_SPEC = ROOT / "specs" / "tiny-int8.yaml"


def manifest(repository: Path) -> dict:
    return json.loads((repository / "manifest.json").read_text())["components"]


def served_graphs(repository: Path) -> dict[str, Path]:
    """component -> the graph the repository serves."""
    return {name: repository / name / "1" / "model.onnx" for name in ("vision_encoder", "audio_encoder", "llm")}


def pipeline_figures(reference: Path, candidate: Path) -> PipelineFigures:
    """The served pipeline of ``candidate`` against ``reference``'s on the INT8 spec's held-out requests,
    under its pipeline gate, measured here on the published graphs (not the build's own numbers)."""
    spec = load_spec(INT8_SPEC)
    facts = ModelFacts.load(reference / "preprocess" / "1" / "model_facts.json")
    preprocess = server_preprocessor(spec, facts, reference / "preprocess" / "1" / "tokenizer.json")
    files = calibration_files(spec, with_images=True, with_audio=True)
    requests = held_out_requests(files, preprocess, facts)
    continuations = fixed_continuations(files, preprocess.tokenizer, len(requests), POSITIONS)
    runner = TARGETS[spec.target].llm.gate_runner
    encoders = ("vision_encoder", "audio_encoder")
    gate = PipelineGate({c: served_graphs(reference)[c] for c in encoders},
                        lambda: RunnerScorer(runner(served_graphs(reference)["llm"], facts)), requests, continuations, facts,
                        spec.quantize.pipeline_gate)
    return gate.measure({c: served_graphs(candidate)[c] for c in encoders},
                        RunnerScorer(runner(served_graphs(candidate)["llm"], facts)))


def build_int8(output: Path, **overrides: object) -> Path:
    build(load_spec(INT8_SPEC, overrides), output, CACHE, progress=False)
    return output


@pytest.fixture(scope="module")
def int8_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_int8(tmp_path_factory.mktemp("int8") / "repo")


def test_calibration_and_holdout_are_different_files_through_server_preprocessing(built_repository: Path) -> None:
    spec = load_spec(INT8_SPEC)
    files = calibration_files(spec, with_images=True, with_audio=True)
    assert len(files.images) == len(files.audio) == spec.calibration.samples + spec.calibration.holdout
    facts = ModelFacts.load(built_repository / "preprocess" / "1" / "model_facts.json")
    samples = load_samples(files, server_preprocessor(spec, facts, built_repository / "preprocess" / "1" / "tokenizer.json"))
    assert len(samples.pixel_values.calibration) == spec.calibration.samples
    assert len(samples.pixel_values.holdout) == spec.calibration.holdout
    cell, longest = facts.image.cell, facts.image.longest_edge
    pixels = [feeds["pixel_values"] for feeds in samples.pixel_values.holdout]
    assert all(x.shape[:2] == (1, 3) and x.shape[2] % cell == x.shape[3] % cell == 0 and max(x.shape[2:]) <= longest
               for x in pixels)  # each photo at its own size, as the server resizes it
    assert len({feeds["pixel_values"].shape for feeds in samples.pixel_values.calibration}) > 1
    assert all(feeds["input_features"].shape[1:] == (facts.audio.num_mel_bins, facts.audio.frames)
               for feeds in samples.input_features.calibration)
    assert len(samples.prompts) == spec.calibration.holdout
    # Held out: nothing the gate sees was calibrated on.
    held = {p.name for p in files.images[spec.calibration.samples :]}
    assert held.isdisjoint(p.name for p in files.images[: spec.calibration.samples])
    smaller = calibration_files(load_spec(INT8_SPEC, {"calibration.holdout": 3}), with_images=True, with_audio=True)
    assert smaller.digest != files.digest  # another split is another cache key


def test_missing_calibration_files_name_the_key(tmp_path: Path) -> None:
    spec = load_spec(INT8_SPEC, {"calibration.images": str(tmp_path)})
    with pytest.raises(BuildError, match=r"calibration\.images: .* holds 0 .* 12 are needed"):
        calibration_files(spec, with_images=True, with_audio=True)


def test_int8_build_passes_the_gate_and_reports_it(int8_repository: Path, built_repository: Path) -> None:
    """Every component is gated alone; what the pipeline gate then keeps depends on this CPU's INT8 kernels,
    so the test asserts what the build promises: each published component passed its gate, and the
    pipeline passed the pipeline gate, figures and CPU recorded."""
    int8, fp32 = manifest(int8_repository), manifest(built_repository)
    for name in ("vision_encoder", "audio_encoder", "llm"):
        q = int8[name]["quantization"]
        assert not q["attempts"][-1]["gate"] or not q["attempts"][-1]["gate"]["failures"]
        assert int8[name]["precision"] == "fp32" or int8[name]["bytes"] < fp32[name]["bytes"]
    assert int8["llm"]["quantization"]["attempts"][0]["agreement"]["positions"] == 32
    pipeline = json.loads((int8_repository / "manifest.json").read_text())["pipeline_gate"]
    assert pipeline["passed"] and [k["kind"] for k in pipeline["figures"]["kinds"]] == [
        "text", "text+image", "text+audio", "text+image+audio"]
    assert "avx" in pipeline["cpu"] or "unknown" not in pipeline["cpu"]
    report = (int8_repository / "build_report.md").read_text()
    assert "teacher-forced agreement" in report and "## Pipeline gate" in report and "| text+image+audio |" in report


def test_impossible_gate_walks_the_ladder_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = build_int8(tmp_path / "repo", **{"quantize.gate.min_cosine": 1.0, "components.llm.precision": "fp32",
                                              "components.audio.precision": "fp32"})
    vision = manifest(output)["vision_encoder"]
    attempts = vision["quantization"]["attempts"]
    assert [a["scheme"] for a in attempts] == [
        "U8S8 minmax", "U8S8 entropy", "U8S8 percentile", attempts[3]["scheme"], "fp32 (reference)",
    ]
    assert attempts[3]["excluded"], "the exclusion rung keeps the most sensitive nodes in float"
    assert all(a["gate"]["failures"] for a in attempts[:-1])
    assert vision["precision"] == "fp32"  # nothing below the gate is published
    assert "fell back after" in capsys.readouterr().out
    assert "| vision_encoder | fp32 (asked int8) |" in (output / "build_report.md").read_text()


def test_gate_failure_without_fallback_fails_the_build(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="failed the accuracy gate .* quantize.fallback is false"):
        build_int8(tmp_path / "repo", **{"quantize.gate.min_cosine": 1.0, "quantize.fallback": False,
                                         "components.llm.precision": "fp32"})
    assert not (tmp_path / "repo").exists()


def test_int8_pipeline_agrees_with_fp32_at_least_as_the_gate_promises(int8_repository: Path, built_repository: Path) -> None:
    """Measured here, on this machine, on the published graphs (not the build's own numbers): the INT8
    pipeline agrees with the FP32 one at least as much as the spec's pipeline gate says, for every kind."""
    spec = load_spec(INT8_SPEC)
    figures = pipeline_figures(built_repository, int8_repository)
    print(f"INT8 vs FP32 pipeline: {figures.summary()}")
    assert len(figures.kinds) == 4 and all(k.agreement.positions == 32 for k in figures.kinds)
    assert figures.passed, figures.summary()
    assert figures.worst_agreement >= spec.quantize.pipeline_gate.min_agreement


def test_a_harsh_pipeline_gate_falls_back_component_by_component(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = build_int8(tmp_path / "repo", **{"quantize.pipeline_gate.min_agreement": 1.0,
                                              "quantize.pipeline_gate.min_cosine": 0.99999})
    pipeline = json.loads((output / "manifest.json").read_text())["pipeline_gate"]
    assert pipeline["passed"] and pipeline["steps"], "the gate walked ladders until the pipeline passed"
    assert all(k["agreement"]["agreement"] == 1.0 and k["agreement"]["logits"]["cosine"] >= 0.99999
               for k in pipeline["figures"]["kinds"]), "what was published meets the harsh gate"
    rejected = pipeline["rejected"]  # component -> rungs the gate turned down, one per step
    assert len(rejected) >= 2 and sum(rejected.values()) == len(pipeline["steps"]), "component by component"
    assert pipeline["precisions"] == {name: manifest(output)[name]["precision"] for name in pipeline["precisions"]}
    printed = capsys.readouterr().out
    assert all(f"pipeline gate: {step}" in printed for step in pipeline["steps"]) and "pipeline gate (" in printed
    assert "(rejected by the pipeline gate)" in (output / "build_report.md").read_text()


def test_a_failing_pipeline_gate_without_fallback_fails_the_build(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="failed the pipeline gate .* quantize.fallback is false"):
        build_int8(tmp_path / "repo", **{"quantize.pipeline_gate.min_cosine": 0.99999999, "quantize.fallback": False,
                                         "quantize.gate.min_cosine": 0.5, "quantize.llm_gate.min_cosine": 0.5})
    assert not (tmp_path / "repo").exists()


def dequantized_matmuls(graph: onnx.GraphProto, bits: int = 8) -> list[onnx.NodeProto]:
    """The DequantizeLinear nodes whose output is a MatMul's weight; asserts each reads int8 (int4) weights."""
    producers = {out: node for node in graph.node for out in node.output}
    weights = {i.name: i for i in graph.initializer}
    found = [producers[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in producers
             and producers[n.input[1]].op_type == "DequantizeLinear"]
    kind = onnx.TensorProto.INT8 if bits == 8 else onnx.TensorProto.INT4
    assert all(weights[dq.input[0]].data_type == kind for dq in found)
    return found


@pytest.mark.parametrize(("block", "bits", "awq"), [(None, 8, False), (32, 8, False), (32, 4, False), (32, 4, True)])
def test_tensorrt_integer_llm_graph_is_dequantize_feeding_matmul(appended_llm: Path, llm_job: LlmJob, tmp_path: Path,
                                                                block: int | None, bits: int, awq: bool) -> None:
    """TensorRT cannot parse MatMulNBits: its INT8 / INT4 LLM is standard ONNX, int8 / int4 weights -> DequantizeLinear
    (opset 21, blocked) -> MatMul, written from the checkpoint's shards as the ladder writes it (AWQ's rung: a Mul by
    1/s before each decoder MatMul, a standard op too)."""
    fp32 = appended_llm  # the exported FP32 graph (the repository serves it fused for ONNX Runtime)
    output = tmp_path / "llm-qdq.onnx"
    (rung,) = [r for r in qdq_weight_rungs(f"int{bits}", load_spec(INT8_SPEC).quantize)
               if r.weights.bits == bits and r.weights.block_size == block and r.awq == awq]
    rung.write(tiny_llm_source(load_spec(INT8_SPEC)), output, llm_job.awq_scales)
    model = load_onnx(output)
    assert awq == any(n.op_type == "Mul" and n.name.endswith("_awq") for n in model.graph.node)
    onnx.checker.check_model(model)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"} and next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    ops = {node.op_type for node in model.graph.node}
    assert "MatMulNBits" not in ops and all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    reference = load_onnx(fp32).graph
    matrices = {i.name for i in reference.initializer if len(i.dims) == 2}
    float_weights = [n for n in reference.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in matrices]
    dequantize = dequantized_matmuls(model.graph, bits)
    # every weight-carrying MatMul, the lm_head too; the exported graph writes q, k and v as one MatMul (split back),
    # which AWQ's rung keeps apart (each its own scales)
    splits = {n.input[0]: len(n.output) for n in reference.node if n.op_type == "Split" and n.name.endswith("/packed/split")}
    linears = sum(splits.get(n.output[0], 1) for n in float_weights)
    assert float_weights and len(dequantize) == (linears if awq else len(float_weights)) and linears > len(float_weights)
    lookups = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0].endswith("_fp16")]
    assert lookups and all(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer
                           if i.name in {n.input[0] for n in lookups})  # the embedding table in FP16
    attributes = [{a.name: a.i for a in dq.attribute} for dq in dequantize]
    assert all(a == ({"axis": 0, "block_size": block} if block else {"axis": 1}) for a in attributes)
    weights = sum(numpy_helper.to_array(i).size for i in reference.initializer if i.name in {n.input[1] for n in float_weights})
    quantized = sum(len(i.raw_data) for i in model.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4))
    assert quantized == weights * bits // 8  # int4: two weights a byte
    onnxruntime_session(output)  # ONNX Runtime runs this very graph (the gate's measurement)


@pytest.fixture(scope="module")
def llm_job(built_repository: Path) -> LlmJob:
    """The tiny LLM's held-out prompts, fused as the server fuses them, and the checkpoint's logits on them in
    PyTorch: what the LLM gate judges."""
    spec = load_spec(INT8_SPEC)
    facts = ModelFacts.load(built_repository / "preprocess" / "1" / "model_facts.json")
    tokenizer = built_repository / "preprocess" / "1" / "tokenizer.json"
    preprocess = server_preprocessor(spec, facts, tokenizer)
    graphs = served_graphs(built_repository)
    encoders = {name: onnxruntime_session(graphs[name]) for name in ("vision_encoder", "audio_encoder")}
    files = calibration_files(spec, with_images=True, with_audio=True)
    prompts = tuple(fuse_prompt(p, encoders, facts) for p in load_samples(files, preprocess).prompts)
    continuations = fixed_continuations(files, preprocess.tokenizer, len(prompts), POSITIONS)
    source = tiny_llm_source(spec)
    reference = score_all(TorchScorer.load(source.checkpoint, tokenizer, spec.limits), prompts, continuations)
    scales_directory = Path(tempfile.mkdtemp(prefix="awq-"))

    def awq_scales(bits: int, block_size: int) -> Path:  # on the calibration prompts, text alone, as the stage does
        calibration = [preprocess(text, [], []) for text in files.calibration_prompts]
        return search_scales(TorchScorer.load(source.checkpoint, tokenizer, spec.limits),
                             [FusedPrompt(c.input_ids, np.zeros((c.input_ids.size, facts.hidden_size), np.float32),
                                          np.zeros(c.input_ids.size, bool)) for c in calibration],
                             bits, block_size, scales_directory / f"awq-{bits}-{block_size}.npz")

    return LlmJob(facts, prompts, continuations, reference, source, awq_scales)


def tiny_llm_source(spec: BuildSpec) -> LlmSource:
    """What the ladder writes the tiny LLM's candidates from: the preset's checkpoint shards."""
    return LlmSource(resolve_source(spec.source, StageCache(CACHE)).checkpoint, spec.limits, spec.export.opset)


def test_tensorrt_int8_llm_settles_on_qdq_gated_with_onnxruntime(llm_job: LlmJob, tmp_path: Path) -> None:
    """With target tensorrt the INT8 LLM's ladder is Q/DQ only, gated on this CPU by ONNX Runtime against the
    spec's LLM gate; nothing silently becomes FP16: a fall back is recorded with the rungs that failed."""
    spec = load_spec(INT8_SPEC)
    settled = settle_llm(llm_job, "int8", TARGETS["tensorrt"].llm, spec.quantize, tmp_path)
    first = settled.attempts[0]
    assert first.scheme == "weight-only Q/DQ per channel" and first.agreement.positions == 32
    assert not any("compute" in a.scheme for a in settled.attempts), "MatMulNBits rungs are ORT-only"
    final = settled.final
    assert final.gate is None or (final.gate.passed and final.agreement.logits.cosine >= spec.quantize.llm_gate.min_cosine)
    if settled.precision == "int8":  # the graph TensorRT builds is the one that passed
        assert dequantized_matmuls(load_onnx(settled.path).graph)
    else:
        assert settled.fell_back and "fell back after weight-only Q/DQ per channel" in settled.summary()


def test_int4_llm_walks_4_bit_rungs_then_int8_and_says_so(llm_job: LlmJob, tmp_path: Path) -> None:
    """``precision: int4``: MatMulNBits bits 4 (int8 then float compute, then blocks of 16), then INT8's rungs, then
    FP32, each gated against FP32 on the held-out prompts; what it settled on passed the LLM gate, and a fall back
    names the rungs that failed."""
    spec = load_spec(INT8_SPEC)
    settled = settle_llm(llm_job, "int4", TARGETS["python"].llm, spec.quantize, tmp_path)
    first = settled.attempts[0]
    assert first.precision == "int4" and first.scheme == f"weight-only block {spec.quantize.llm_block_size}, int8 compute"
    precisions = [a.precision for a in settled.attempts]
    assert precisions == sorted(precisions, key=["int4", "int8", "fp32"].index)  # never back up the ladder
    schemes = [a.scheme for a in settled.attempts]
    print(settled.summary())
    if len(schemes) > 3:  # the three round-to-nearest 4-bit rungs failed: the calibrated one came next
        assert schemes[3] == f"weight-only block {spec.quantize.llm_block_size}, AWQ scales, int8 compute"
    final = settled.final
    assert final.gate is None or (final.gate.passed and final.agreement.logits.cosine >= spec.quantize.llm_gate.min_cosine)
    if settled.precision == "int4":
        nodes = [n for n in load_onnx(settled.path).graph.node if n.op_type == "MatMulNBits"]
        assert nodes and all({a.name: a.i for a in n.attribute}["bits"] == 4 for n in nodes)
    else:
        assert settled.fell_back and "fell back after weight-only block" in settled.summary()


def test_int4_is_for_the_llm_only() -> None:
    with pytest.raises(SpecError, match=r"components\.vision\.precision: int4 is for the llm's weights"):
        parse_spec({"components": {"vision": {"precision": "int4"}}})
    assert parse_spec({"components": {"llm": {"precision": "int4"}}}).components.llm.precision == "int4"
