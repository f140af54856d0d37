"""The quantize stage in the build: per component, cached under a key of everything it depends on.

Ranges from calibration are a cache entry of their own (per component and method), so a change of
target or gate re-quantizes from the same ranges without calibrating again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tqdm import tqdm

from builder.cache import StageCache, code_fingerprint, make_key, tool_versions
from builder.export.onnx_export import ExportedGraph
from builder.quantize.agreement import fuse_prompt
from builder.quantize.calibration_data import CalibrationFiles, CalibrationSamples, load_samples, server_preprocessor
from builder.quantize.gate import session
from builder.quantize.ladder import EncoderJob, LlmJob, Settled, settle_encoder, settle_llm
from builder.quantize.qdq import calibrate
from builder.quantize.reader import SampleReader
from builder.runtime.model_facts import ModelFacts
from builder.spec import BuildSpec

_INPUTS = {"vision_encoder": "pixel_values", "audio_encoder": "input_features"}


def quantize_key(spec: BuildSpec, export_key: str, precision: str, files: CalibrationFiles | None) -> str:
    if precision == "fp32":
        return export_key
    assert files is not None
    return make_key(export_key, precision, spec.target, files.digest, spec.section("quantize"), spec.section("calibration"),
                    code_fingerprint("quantize"), tool_versions())


def quantize_components(
    spec: BuildSpec, facts: ModelFacts, tokenizer: Path, exported: dict[str, ExportedGraph], precisions: dict[str, str],
    export_keys: dict[str, str], files: CalibrationFiles | None, cache: StageCache, progress: bool,
) -> dict[str, Settled]:
    """Components in FP32 pass through; the others are quantized, or read from the cache."""
    samples: CalibrationSamples | None = None
    settled: dict[str, Settled] = {}
    for component, graph in exported.items():  # encoders before the LLM: its gate prompts use them
        precision = precisions[component]
        if precision == "fp32":
            settled[component] = Settled(component, "fp32", "fp32", graph.path, 0, 0, ())
            continue
        key = quantize_key(spec, export_keys[component], precision, files)
        entry = cache.lookup("quantize", component, key)
        if entry is None:
            if samples is None:
                assert files is not None
                samples = load_samples(files, server_preprocessor(spec, facts, tokenizer))
            calibration_key = make_key(export_keys[component], files.digest, spec.section("calibration"),
                                       code_fingerprint("quantize"), tool_versions())
            with cache.writer("quantize", component, key) as tmp:
                result = _settle(spec, facts, component, graph, precision, exported, samples, cache, calibration_key, tmp, progress)
            entry = cache.entry("quantize", component, key)
            settled[component] = dataclasses.replace(result, path=entry / result.path.name if result.precision != "fp32" else graph.path)
        else:
            settled[component] = Settled.from_json(json.loads((entry / "quantize.json").read_text()), entry, graph.path)
        tqdm.write(f"quantize: {settled[component].summary()}")
    return settled


def _settle(
    spec: BuildSpec, facts: ModelFacts, component: str, graph: ExportedGraph, precision: str,
    exported: dict[str, ExportedGraph], samples: CalibrationSamples, cache: StageCache, calibration_key: str,
    directory: Path, progress: bool,
) -> Settled:
    if component == "llm":
        encoders = {name: session(g.path) for name, g in exported.items() if name != "llm"}
        prompts = tuple(fuse_prompt(p, encoders, facts) for p in samples.prompts)
        return settle_llm(LlmJob(graph.path, facts, prompts), precision, spec.target, spec.quantize, directory)
    input_name = _INPUTS[component]
    split = samples.pixel_values if component == "vision_encoder" else samples.input_features
    assert split is not None

    def ranges(method: str) -> Path:
        key = make_key(calibration_key, method)
        entry = cache.lookup("calibration", component, key)
        if entry is None:
            with cache.writer("calibration", component, key) as tmp:
                reader = SampleReader(input_name, split.calibration, f"{component}: calibrate ({method})", progress)
                calibrate(graph.path, reader, method, tmp / "ranges.json")
            entry = cache.entry("calibration", component, key)
        return entry / "ranges.json"

    job = EncoderJob(component, graph.path, input_name, tuple(o.name for o in graph.outputs), split.calibration,
                     split.holdout, ranges)
    return settle_encoder(job, precision, spec.target, spec.quantize, directory, progress)
