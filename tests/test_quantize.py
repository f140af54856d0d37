"""The quantize stage: calibration data, the gate and its fallback ladder, FP16, INT8 end-to-end agreement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.build import build
from builder.errors import BuildError
from builder.quantize.agreement import fuse_prompt, teacher_forced
from builder.quantize.calibration_data import calibration_files, load_samples, server_preprocessor
from builder.quantize.gate import session
from builder.runtime.generation import LanguageModelRunner
from builder.runtime.model_facts import ModelFacts
from builder.spec import load_spec
from tests.conftest import CACHE, ROOT

INT8_SPEC = ROOT / "specs" / "tiny-int8.yaml"


def manifest(repository: Path) -> dict:
    return json.loads((repository / "manifest.json").read_text())["components"]


def build_int8(output: Path, **overrides: object) -> Path:
    build(load_spec(INT8_SPEC, overrides), output, CACHE, progress=False)
    return output


@pytest.fixture(scope="module")
def int8_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_int8(tmp_path_factory.mktemp("int8") / "repo")


def test_calibration_and_holdout_are_different_files_through_server_preprocessing(built_repository: Path) -> None:
    spec = load_spec(INT8_SPEC)
    files = calibration_files(spec, with_audio=True)
    assert len(files.images) == len(files.audio) == spec.calibration.samples + spec.calibration.holdout
    facts = ModelFacts.load(built_repository / "preprocess" / "1" / "model_facts.json")
    samples = load_samples(files, server_preprocessor(spec, facts, built_repository / "preprocess" / "1" / "tokenizer.json"))
    assert len(samples.pixel_values.calibration) == spec.calibration.samples
    assert len(samples.pixel_values.holdout) == spec.calibration.holdout
    assert {x.shape for x in samples.pixel_values.holdout} == {(1, 3, facts.image_size, facts.image_size)}
    assert all(x.shape[1:] == (facts.num_mel_bins, facts.clip_samples // 160) for x in samples.input_features.calibration)
    assert len(samples.prompts) == spec.calibration.holdout
    # Held out: nothing the gate sees was calibrated on.
    held = {p.name for p in files.images[spec.calibration.samples :]}
    assert held.isdisjoint(p.name for p in files.images[: spec.calibration.samples])
    smaller = calibration_files(load_spec(INT8_SPEC, {"calibration.holdout": 3}), with_audio=True)
    assert smaller.digest != files.digest  # another split is another cache key


def test_missing_calibration_files_name_the_key(tmp_path: Path) -> None:
    spec = load_spec(INT8_SPEC, {"calibration.images": str(tmp_path)})
    with pytest.raises(BuildError, match=r"calibration\.images: .* holds 0 .* 12 are needed"):
        calibration_files(spec, with_audio=True)


def test_int8_build_passes_the_gate_and_reports_it(int8_repository: Path, built_repository: Path) -> None:
    int8, fp32 = manifest(int8_repository), manifest(built_repository)
    for name in ("vision_encoder", "audio_encoder", "llm"):
        q = int8[name]["quantization"]
        assert int8[name]["precision"] == "int8" and len(q["attempts"]) == 1
        assert not q["attempts"][0]["gate"]["failures"]
        assert int8[name]["bytes"] < fp32[name]["bytes"]
    assert int8["vision_encoder"]["quantization"]["calibration_samples"] == 8
    assert int8["llm"]["quantization"]["attempts"][0]["agreement"]["positions"] == 32
    report = (int8_repository / "build_report.md").read_text()
    assert "| vision_encoder | int8 |" in report and "U8S8 minmax" in report and "teacher-forced agreement" in report


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


def test_fp16_encoder_is_gated(tmp_path: Path) -> None:
    output = build_int8(tmp_path / "repo", **{"components.vision.precision": "fp16", "components.audio.precision": "fp32",
                                              "components.llm.precision": "fp32"})
    vision = manifest(output)["vision_encoder"]
    assert vision["precision"] == "fp16"
    assert vision["quantization"]["attempts"][0]["gate"]["outputs"][0]["cosine"] > 0.999


def test_int8_pipeline_agrees_with_fp32_teacher_forced(int8_repository: Path, built_repository: Path) -> None:
    """Text+image and text+audio prompts: the INT8 encoders + LLM, fed the FP32 pipeline's greedy prefix,
    pick the same next token at most of the first 32 positions (measured: 88% and 100%)."""
    spec = load_spec(INT8_SPEC)
    facts = ModelFacts.load(built_repository / "preprocess" / "1" / "model_facts.json")
    preprocess = server_preprocessor(spec, facts, built_repository / "preprocess" / "1" / "tokenizer.json")
    data = ROOT / "data" / "calibration"
    requests = [
        preprocess("Describe this picture.", [(data / "images" / "08-chelsea.jpg").read_bytes()], []),
        preprocess("What does the speaker say?", [], [(data / "audio" / "09-en-us.wav").read_bytes()]),
    ]

    def pipeline(repository: Path) -> tuple[dict, LanguageModelRunner]:
        encoders = {n: session(repository / n / "1" / "model.onnx") for n in ("vision_encoder", "audio_encoder")}
        return encoders, LanguageModelRunner(str(repository / "llm" / "1" / "model.onnx"), facts)

    (fp32_encoders, fp32_llm), (int8_encoders, int8_llm) = pipeline(built_repository), pipeline(int8_repository)
    for request in requests:
        result = teacher_forced(fp32_llm, int8_llm, [(fuse_prompt(request, fp32_encoders, facts),
                                                      fuse_prompt(request, int8_encoders, facts))])
        print(f"INT8 vs FP32: {result.summary()}")
        assert result.positions == 32
        assert result.agreement >= 0.75  # random weights: near-ties flip; the tiny model's logits are not peaked
        assert result.logits.cosine >= 0.9
