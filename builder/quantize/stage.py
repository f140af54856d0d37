"""The quantize stage in the build: per component, cached under a key of everything it depends on,
then the pipeline gate over all of them (its outcome cached too).

Ranges from calibration are a cache entry of their own (per component and method), so a change of
target or gate re-quantizes from the same ranges without calibrating again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tqdm import tqdm

from builder.cache import Stage, StageCache
from builder.compare import onnxruntime_session
from builder.components import COMPONENTS, LLM
from builder.errors import BuildError
from builder.export.graph import ExportedGraph
from builder.quantize.agreement import POSITIONS, FusedPrompt, LogitScorer, RunnerScorer, fuse_prompt, score_all
from builder.quantize.calibration_data import (
    CalibrationFiles,
    CalibrationSamples,
    fixed_continuations,
    load_samples,
    server_preprocessor,
)
from builder.quantize.ladder import (
    EncoderForms,
    EncoderJob,
    LlmForms,
    LlmJob,
    LlmSource,
    Settled,
    settle_encoder,
    settle_llm,
)
from builder.quantize.pipeline import PipelineFigures, PipelineGate, PipelineResult, cpu_description, held_out_requests
from builder.quantize.qdq import calibrate
from builder.quantize.reader import SampleReader
from builder.runtime.model_facts import ModelFacts
from builder.runtime.preprocess import Preprocessor
from builder.runtime.text import load_tokenizer
from builder.spec import BuildSpec


QUANTIZE = Stage("quantize", ("quantize",))  # a component settled on its ladder
CALIBRATION = Stage("calibration", ("quantize",))  # an encoder's ranges, one entry per method
PIPELINE_GATE = Stage("pipeline", ("quantize",))  # the pipeline gate's walk over the components


def is_quantized(precision: str) -> bool:
    """INT8 and INT4 are made here: FP32 and FP16 graphs are served as exported (FP16: see builder.export.precision)."""
    return precision in ("int8", "int4")


def quantize_key(spec: BuildSpec, export_key: str, precision: str, files: CalibrationFiles | None) -> str:
    if not is_quantized(precision):
        return export_key
    assert files is not None
    quantize = {k: v for k, v in spec.section("quantize").items() if k != "pipeline_gate"}  # the gate decides rungs, later
    return QUANTIZE.key(export_key, precision, spec.target, files.digest, quantize, spec.section("calibration"))


def quantize_components(
    spec: BuildSpec, checkpoint: Path, facts: ModelFacts, tokenizer: Path, exported: dict[str, ExportedGraph],
    precisions: dict[str, str],
    export_keys: dict[str, str], files: CalibrationFiles | None, forms: tuple[EncoderForms, LlmForms], cache: StageCache,
    progress: bool,
) -> tuple[dict[str, Settled], PipelineResult | None]:
    """Components in FP32 pass through; the others are quantized (or read from the cache) in the forms the target's
    backends run (``forms``: encoders, LLM), then the whole pipeline is gated: while it fails, the component that
    costs most walks one rung down its ladder. The LLM's candidates are written from ``checkpoint``'s shards."""
    stage = _Stage(spec, LlmSource(checkpoint, spec.limits, spec.export.opset), facts, tokenizer, exported, precisions,
                   export_keys, files, forms, cache, progress)
    if not any(map(is_quantized, precisions.values())):
        return {c: stage.settle(c, 0) for c in exported}, None
    assert files is not None
    # The CPU too: another machine's INT8 kernels round differently and may walk the ladders elsewhere.
    gate_key = PIPELINE_GATE.key([quantize_key(spec, export_keys[c], precisions[c], files) for c in exported],
                                 spec.section("quantize"), cpu_description())
    entry = PIPELINE_GATE.lookup(cache, "gate", gate_key)
    if entry is not None:  # the gate's walk is deterministic on this machine: replay its outcome
        result = PipelineResult.from_json(json.loads((entry / "pipeline.json").read_text()))
        settled = {c: stage.settle(c, result.rejected.get(c, 0)) for c in exported}
        for step in result.steps:
            tqdm.write(f"pipeline gate: {step}")
    else:
        settled, result = _gate(stage, spec, facts, files)
        walked = json.dumps(result.to_json(), indent=2)
        PIPELINE_GATE.run(cache, "gate", gate_key, lambda tmp: (tmp / "pipeline.json").write_text(walked))
    chosen = ", ".join(f"{c} {s.precision}" + (f" ({s.final.label()})" if is_quantized(s.precision) else "") for c, s in settled.items())
    tqdm.write(f"pipeline gate ({result.cpu}): settled on {chosen}; {result.figures.summary()}")
    return settled, result


def _gate(stage: "_Stage", spec: BuildSpec, facts: ModelFacts, files: CalibrationFiles) -> tuple[dict[str, Settled], PipelineResult]:
    rejected = dict.fromkeys(stage.exported, 0)
    settled = {c: stage.settle(c, 0) for c in stage.exported}
    requests = held_out_requests(files, stage.preprocessor(), facts)
    encoders = {c: _done_path(g) for c, g in stage.exported.items() if c != LLM.name}
    gate = PipelineGate(encoders, stage.reference_llm, requests, stage.continuations(len(requests)), facts,
                        spec.quantize.pipeline_gate)
    steps: list[str] = []

    def measure(current: dict[str, Settled], reference: str | None = None) -> PipelineFigures:
        """The pipeline of ``current``, with component ``reference`` swapped back to its reference."""
        pipeline_encoders = {c: encoders[c] if c == reference else s.path for c, s in current.items() if c != LLM.name}
        return gate.measure(pipeline_encoders, None if reference == LLM.name else stage.llm_scorer(current[LLM.name]))

    while True:
        figures = measure(settled)
        quantized = [c for c, s in settled.items() if is_quantized(s.precision)]
        if figures.passed or not quantized:
            break
        if not spec.quantize.fallback:
            raise BuildError(f"the quantized pipeline failed the pipeline gate ({figures.summary()}) and quantize.fallback is false")
        # Swap each quantized component back to its reference in turn: the one whose swap helps most costs most.
        swapped = {c: measure(settled, c).worst_agreement for c in quantized}
        costliest = max(swapped, key=swapped.__getitem__)
        rejected[costliest] += 1
        steps.append(f"worst agreement {figures.worst_agreement:.1%} ({'; '.join(figures.failures)}); {costliest} costs most "
                     f"({swapped[costliest]:.1%} with it in FP32): {settled[costliest].final.label()} -> its next rung")
        tqdm.write(f"pipeline gate: {steps[-1]}")
        settled[costliest] = stage.settle(costliest, rejected[costliest])
    result = PipelineResult(figures, {c: s.precision for c, s in settled.items()}, tuple(steps), cpu_description(),
                            {c: n for c, n in rejected.items() if n})
    return settled, result


def _done_path(graph: ExportedGraph) -> Path:
    assert graph.path is not None, "only an integer LLM's export has no graph"
    return graph.path


class _Stage:
    """Settles one component at a time, from the cache when it can; loads calibration samples once, when needed."""

    def __init__(self, spec: BuildSpec, source: LlmSource, facts: ModelFacts, tokenizer: Path, exported: dict[str, ExportedGraph],
                 precisions: dict[str, str], export_keys: dict[str, str], files: CalibrationFiles | None,
                 forms: tuple[EncoderForms, LlmForms], cache: StageCache, progress: bool) -> None:
        self.spec, self.source, self.facts, self.tokenizer, self.exported = spec, source, facts, tokenizer, exported
        self.forms = forms
        self.precisions, self.export_keys, self.files, self.cache, self.progress = precisions, export_keys, files, cache, progress
        self._samples: CalibrationSamples | None = None

    def preprocessor(self) -> Preprocessor:
        return server_preprocessor(self.spec, self.facts, self.tokenizer)

    def continuations(self, count: int) -> tuple[np.ndarray, ...]:
        assert self.files is not None
        return fixed_continuations(self.files, load_tokenizer(str(self.tokenizer)), count, POSITIONS)

    def reference_llm(self) -> LogitScorer:
        """The LLM the gates compare with: a quantized one's is the checkpoint in PyTorch (its FP32 graph is never
        written), an FP32 or FP16 one's is its exported graph."""
        graph = self.exported[LLM.name]
        if graph.path is None:
            from builder.quantize.reference import TorchScorer  # torch: only a build that quantizes the LLM loads it

            return TorchScorer.load(self.source.checkpoint, self.tokenizer, self.spec.limits)
        return RunnerScorer(self.forms[1].gate_runner(graph.path, self.facts))

    def llm_scorer(self, settled: Settled) -> LogitScorer:
        return RunnerScorer(self.forms[1].gate_runner(settled.path, self.facts))

    def samples(self) -> CalibrationSamples:
        if self._samples is None:
            assert self.files is not None
            self._samples = load_samples(self.files, self.preprocessor())
        return self._samples

    def settle(self, component: str, rejected: int) -> Settled:
        """``rejected``: passing rungs the pipeline gate turned down; each count is its own cache entry."""
        spec, graph, precision = self.spec, self.exported[component], self.precisions[component]
        if not is_quantized(precision):
            return Settled(component, precision, precision, _done_path(graph), 0, 0, ())
        files, export_key = self.files, self.export_keys[component]
        assert files is not None
        key = quantize_key(spec, export_key, precision, files)
        key = QUANTIZE.key(key, "pipeline-rejected", rejected) if rejected else key
        calibration_key = CALIBRATION.key(export_key, files.digest, spec.section("calibration"))

        def settle_into(tmp: Path) -> None:  # writes quantize.json beside the graph it settled on
            _settle(self, component, graph, precision, calibration_key, tmp, rejected)

        entry = QUANTIZE.run(self.cache, component, key, settle_into)
        settled = Settled.from_json(json.loads((entry / "quantize.json").read_text()), entry, graph.path)
        tqdm.write(f"quantize: {settled.summary()}")
        return settled


def _settle(stage: _Stage, component: str, graph: ExportedGraph, precision: str, calibration_key: str, directory: Path,
            rejected: int) -> Settled:
    spec, samples, progress = stage.spec, stage.samples(), stage.progress
    encoder_forms, llm_forms = stage.forms
    if component == LLM.name:
        encoders = {name: onnxruntime_session(_done_path(g)) for name, g in stage.exported.items() if name != LLM.name}
        prompts = tuple(fuse_prompt(p, encoders, stage.facts) for p in samples.prompts)
        continuations = stage.continuations(len(prompts))
        reference = score_all(stage.reference_llm(), prompts, continuations)  # the PyTorch model is dropped after

        def awq_scales(bits: int, block_size: int) -> Path:
            def search_into(tmp: Path) -> None:
                from builder.quantize.awq import search_scales
                from builder.quantize.reference import TorchScorer

                scorer = TorchScorer.load(stage.source.checkpoint, stage.tokenizer, spec.limits)
                assert stage.files is not None
                preprocess = stage.preprocessor()
                texts = [preprocess(text, [], []) for text in stage.files.calibration_prompts]
                search_scales(scorer, [FusedPrompt(t.input_ids, np.zeros((t.input_ids.size, stage.facts.hidden_size),
                                                                          np.float32), np.zeros(t.input_ids.size, bool))
                                       for t in texts], bits, block_size, tmp / "awq.npz")

            key = CALIBRATION.key(calibration_key, "awq", bits, block_size)
            return CALIBRATION.run(stage.cache, component, key, search_into) / "awq.npz"

        job = LlmJob(stage.facts, prompts, continuations, reference, stage.source, awq_scales)
        return settle_llm(job, precision, llm_forms, spec.quantize, directory, rejected)
    fp32 = _done_path(graph)
    input_name = COMPONENTS[component].graph_input
    assert input_name is not None
    split = getattr(samples, input_name)
    assert split is not None
    takes = {i.name for i in graph.inputs}  # samples carry every input an encoder of this kind may take
    calibration, holdout = (tuple({k: v for k, v in feeds.items() if k in takes} for feeds in samples_of)
                            for samples_of in (split.calibration, split.holdout))

    def ranges(method: str) -> Path:
        def calibrate_into(tmp: Path) -> None:
            calibrate(fp32, SampleReader(calibration, f"{component}: calibrate ({method})", progress), method,
                      tmp / "ranges.json")

        return CALIBRATION.run(stage.cache, component, CALIBRATION.key(calibration_key, method), calibrate_into) / "ranges.json"

    job = EncoderJob(component, fp32, tuple(o.name for o in graph.outputs), calibration, holdout, ranges)
    return settle_encoder(job, precision, encoder_forms, spec.quantize, directory, progress, rejected)
