"""Quantize a component, gate it, and fall back until a graph passes: nothing below the gate is used.

The ladder for an INT8 encoder: the spec's calibration method, then the other methods (MinMax,
Entropy, Percentile), then the best of them with the most sensitive nodes kept in float, then FP16
(target ``tensorrt`` only: ONNX Runtime on CPU runs FP16 slower than FP32), then FP32. For the INT8
LLM (weight-only round to nearest, no calibration): the spec's block size with int8 then float compute, then
blocks of 16 (target ``tensorrt``: int8 Q/DQ per output channel, then blocks of the spec's size, then 16), then
FP16 / FP32. An INT4 LLM walks the same rungs in 4-bit first, then the calibrated 4-bit rung (AWQ's activation-aware
scales, searched on the calibration prompts: :mod:`builder.quantize.awq`), then INT8's.
An FP16 component: FP16, then FP32. An encoder's FP32 graph is the reference, so it always passes; an LLM's rungs,
FP32 too, are each written from the checkpoint's shards and gated against the checkpoint in PyTorch
(:mod:`builder.quantize.reference`).

Which rungs a component walks is its backend's choice (``builder/targets``): the functions here make
the forms (``matmulnbits_rungs``, ``qdq_weight_rungs``, ``FP16_RUNG``) and walk what they are given.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from builder.compare import GateResult, OutputFigures, figures, judge, run_onnxruntime
from builder.components import LLM
from builder.errors import BuildError
from builder.export.streamed.writer import MatMulWeights, write_streamed_llm
from builder.onnx_files import move_onnx, remove_onnx
from builder.quantize.agreement import Agreement, FusedPrompt, RunnerScorer, agreement, score_all
from builder.quantize.fp16 import convert_fp16
from builder.quantize.qdq import CALIBRATION_METHODS, QdqLayout, quantize_qdq, weight_nodes
from builder.quantize.reader import SampleReader
from builder.quantize.sensitivity import most_sensitive_nodes
from builder.quantize.weight_only import NbitsWeights, QdqWeights, ScaledWeights
from builder.runtime.generation import SequenceRunner
from builder.runtime.model_facts import ModelFacts
from builder.source.preflight import estimate
from builder.spec import GateSpec, LimitsSpec, QuantizeSpec


@dataclass(frozen=True)
class Attempt:
    precision: str  # int4 | int8 | fp16 | fp32
    scheme: str  # "U8S8 minmax", "weight-only block 32", "fp16", "fp32 (reference)"
    excluded: tuple[str, ...] = ()  # nodes kept in float
    gate: GateResult | None = None  # None: the FP32 reference itself
    agreement: Agreement | None = None  # the LLM's teacher-forced figures
    pipeline_rejected: bool = False  # passed its own gate, but the pipeline with it did not pass the pipeline gate

    @property
    def passed(self) -> bool:
        return (self.gate is None or self.gate.passed) and not self.pipeline_rejected

    def label(self) -> str:
        kept = f", {len(self.excluded)} sensitive nodes in float" if self.excluded else ""
        rejected = " (rejected by the pipeline gate)" if self.pipeline_rejected else ""
        return f"{self.scheme}{kept}{rejected}"


@dataclass(frozen=True)
class Settled:
    """What the quantize stage hands on: the graph to compile and how it got there."""

    component: str
    requested: str
    precision: str
    path: Path
    calibration_samples: int
    holdout_samples: int
    attempts: tuple[Attempt, ...]  # in order tried; the last is the one used

    @property
    def final(self) -> Attempt:
        return self.attempts[-1]

    @property
    def fell_back(self) -> bool:
        return len(self.attempts) > 1

    def summary(self) -> str:
        text = f"{self.component}: {self.precision} ({self.final.label()})"
        if self.final.gate is not None:
            text += f", {self.final.gate.summary()}"
        if self.final.agreement is not None:
            text += f"; {self.final.agreement.summary()}"
        if self.fell_back:
            tried = "; ".join(f"{a.label()}: {'pass' if a.passed else 'failed'}" for a in self.attempts[:-1])
            text += f" [asked {self.requested}; fell back after {tried}]"
        return text

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["path"] = self.path.name
        return data

    @classmethod
    def from_json(cls, raw: dict, directory: Path, fp32: Path | None) -> "Settled":
        def gate(g: dict | None) -> GateResult | None:
            return None if g is None else GateResult.from_json(g)

        def agreement(a: dict | None) -> Agreement | None:
            return None if a is None else Agreement(a["prompts"], a["positions"], a["agreement"], OutputFigures(**a["logits"]))

        attempts = tuple(
            Attempt(a["precision"], a["scheme"], tuple(a["excluded"]), gate(a["gate"]), agreement(a["agreement"]),
                    a.get("pipeline_rejected", False))
            for a in raw["attempts"]
        )
        # An encoder in FP32 is the export's graph; an LLM's every form is written by the quantize stage (``fp32`` None).
        path = fp32 if raw["precision"] == "fp32" and fp32 is not None else directory / raw["path"]
        return cls(raw["component"], raw["requested"], raw["precision"], path, raw["calibration_samples"],
                   raw["holdout_samples"], attempts)


@dataclass(frozen=True)
class EncoderJob:
    component: str
    fp32: Path
    output_names: tuple[str, ...]
    calibration: tuple[dict[str, np.ndarray], ...]  # the graph's feeds, one batch per sample
    holdout: tuple[dict[str, np.ndarray], ...]
    ranges: Callable[[str], Path]  # calibration method -> ranges file (one cached pass per method)


@dataclass(frozen=True)
class LlmSource:
    """What the LLM's candidates are written from: the checkpoint's shards, one weight at a time (never the FP32
    graph, which a 24B model's build cannot hold), with the graph's limits and opset."""

    checkpoint: Path
    limits: LimitsSpec
    opset: int


@dataclass(frozen=True)
class LlmJob:
    facts: ModelFacts
    prompts: tuple[FusedPrompt, ...]  # held-out prompts, fused with the FP32 encoders
    continuations: tuple[np.ndarray, ...]  # the fixed tokens fed after each prompt
    reference: tuple[np.ndarray, ...]  # each prompt's reference logits (the checkpoint in PyTorch), computed once
    source: LlmSource
    awq_scales: Callable[[int, int], Path]  # (bits, block size) -> the AWQ search's scales (searched once, cached)


@dataclass(frozen=True)
class LlmRung:
    """One candidate form of the LLM's weights: integer MatMul weights (``weights``) in an FP32 graph, or the whole
    graph in FP16 or FP32 (``weights`` None)."""

    precision: str  # int4 | int8 | fp16 | fp32
    scheme: str
    weights: NbitsWeights | QdqWeights | None
    awq: bool = False  # ``weights`` after AWQ's activation-aware scaling (builder.quantize.awq)

    def write(self, source: LlmSource, path: Path, awq_scales: Callable[[int, int], Path]) -> None:
        dtype = "float16" if self.precision == "fp16" else "float32"
        weights: MatMulWeights | None = self.weights
        if self.awq:
            assert self.weights is not None and self.weights.block_size is not None, "AWQ scales blocked weights"
            weights = ScaledWeights(self.weights, awq_scales(self.weights.bits, self.weights.block_size))
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            written = write_streamed_llm(source.checkpoint, Path(scratch), dtype,
                                         limits=source.limits, opset=source.opset, weights=weights)
            move_onnx(written.path, path)


def _weight_bits(requested: str) -> tuple[int, ...]:
    """INT4 walks its 4-bit rungs, then INT8's."""
    return {"int4": (4, 8), "int8": (8,)}.get(requested, ())


def matmulnbits_rungs(requested: str, spec: QuantizeSpec) -> list[LlmRung]:
    """ONNX Runtime's ``MatMulNBits``, fastest first: integer compute, float compute of the same weights, smaller
    blocks; in 4-bit then the calibrated rung (AWQ scales, integer compute)."""
    rungs = []
    for bits in _weight_bits(requested):
        rungs += [LlmRung(f"int{bits}", f"weight-only block {block}, {'int8' if level == 4 else 'float'} compute",
                          NbitsWeights(bits, block, level))
                  for block, level in dict.fromkeys(((spec.llm_block_size, 4), (spec.llm_block_size, 0), (16, 0)))]
        if bits == 4:
            rungs.append(LlmRung("int4", f"weight-only block {spec.llm_block_size}, AWQ scales, int8 compute",
                                 NbitsWeights(4, spec.llm_block_size, 4), awq=True))
    return rungs


def qdq_weight_rungs(requested: str, spec: QuantizeSpec) -> list[LlmRung]:
    """Weight-only Q/DQ (what TensorRT parses; it cannot parse MatMulNBits): per output channel first, the
    granularity TensorRT documents for INT8 weights, then the finer blocks; in 4-bit then AWQ scales."""
    rungs = []
    for bits in _weight_bits(requested):
        rungs += [LlmRung(f"int{bits}", f"weight-only Q/DQ {f'block {block}' if block else 'per channel'}", QdqWeights(bits, block))
                  for block in dict.fromkeys((None, spec.llm_block_size, 16))]
        if bits == 4:
            rungs.append(LlmRung("int4", f"weight-only Q/DQ block {spec.llm_block_size}, AWQ scales",
                                 QdqWeights(4, spec.llm_block_size), awq=True))
    return rungs


FP16_RUNG = LlmRung("fp16", "fp16", None)  # integer weights failed: FP16 before FP32 (on a GPU)
# The last rung: gated like the others, against the same PyTorch reference; failing it means the graph is wrong.
FP32_RUNG = LlmRung("fp32", "fp32", None)


class EncoderForms(Protocol):
    """What an encoder backend runs: its INT8 layout, and whether FP16 is worth a rung before FP32."""

    qdq_layout: QdqLayout
    fp16_before_fp32: bool


class LlmForms(Protocol):
    """What an LLM backend runs: the rungs it walks for a requested precision, and the runner its gates compare
    a candidate graph through (on this machine)."""

    def rungs(self, requested: str, spec: QuantizeSpec) -> list[LlmRung]: ...

    def gate_runner(self, graph: Path, facts: ModelFacts) -> SequenceRunner: ...


class _Ladder:
    def __init__(self, component: str, requested: str, spec: QuantizeSpec, gate: GateSpec, directory: Path,
                 rejected: int) -> None:
        self.component, self.requested, self.spec, self.gate_spec = component, requested, spec, gate
        self.directory = directory
        self.attempts: list[Attempt] = []
        self.rejected = rejected  # passing rungs the pipeline gate has already turned down: skip them

    def candidate(self) -> Path:
        return self.directory / f"candidate-{len(self.attempts)}.onnx"

    def record(self, attempt: Attempt) -> bool:
        """Keeps the attempt; True if it passed. Without fallback, a failure ends the build."""
        if attempt.passed and attempt.precision != "fp32" and self.rejected > 0:
            self.rejected -= 1
            self.attempts.append(dataclasses.replace(attempt, pipeline_rejected=True))
            return False
        self.attempts.append(attempt)
        if not attempt.passed and not self.spec.fallback:
            raise BuildError(f"{self.component}: {attempt.label()} failed the accuracy gate ({attempt.gate.summary()}) "
                             "and quantize.fallback is false")
        return attempt.passed


def settle_encoder(job: EncoderJob, requested: str, forms: EncoderForms, spec: QuantizeSpec, directory: Path,
                   progress: bool, rejected: int = 0) -> Settled:
    """``forms``: the backend's INT8 layout and FP16 rung; ``rejected``: how many passing rungs the pipeline gate
    turned down (walk past them)."""
    layout = forms.qdq_layout
    ladder = _Ladder(job.component, requested, spec, spec.gate, directory, rejected)
    feeds = list(job.holdout)
    reference = run_onnxruntime(job.fp32, feeds, job.output_names)

    def gated(path: Path) -> GateResult:
        found = figures(run_onnxruntime(path, feeds, job.output_names), reference, job.output_names)
        return judge(found, len(feeds), spec.gate)

    def int8(method: str, excluded: Sequence[str] = ()) -> bool:
        path = ladder.candidate()
        quantize_qdq(job.fp32, path, layout, method, job.ranges(method), excluded)
        return ladder.record(Attempt("int8", f"{layout.name} {method}", tuple(excluded), gated(path)))

    if requested == "int8":
        methods = [spec.method] + [m for m in CALIBRATION_METHODS if m != spec.method]
        if any(int8(method) for method in methods):
            return _settled(job.component, requested, ladder, len(job.calibration), len(job.holdout))
        best = max(ladder.attempts, key=lambda a: a.gate.worst.cosine)
        best_path = directory / f"candidate-{ladder.attempts.index(best)}.onnx"
        method = best.scheme.split()[-1]
        reader = SampleReader(job.calibration[:2], f"{job.component}: sensitivity", progress)
        nodes = most_sensitive_nodes(best_path, weight_nodes(job.fp32, layout.op_types), reader, spec.exclude_nodes)
        if int8(method, nodes):
            return _settled(job.component, requested, ladder, len(job.calibration), len(job.holdout))
    if forms.fp16_before_fp32:
        path = ladder.candidate()
        convert_fp16(job.fp32, path)
        if ladder.record(Attempt("fp16", "fp16", gate=gated(path))):
            return _settled(job.component, requested, ladder, len(job.calibration), len(job.holdout))
    ladder.record(Attempt("fp32", "fp32 (reference)"))
    return _settled(job.component, requested, ladder, len(job.calibration), len(job.holdout), fp32=job.fp32)


def settle_llm(job: LlmJob, requested: str, forms: LlmForms, spec: QuantizeSpec, directory: Path,
               rejected: int = 0) -> Settled:
    """Walks the backend's rungs in order, then FP32, until one passes the LLM gate against the PyTorch reference."""
    ladder = _Ladder(LLM.name, requested, spec, spec.llm_gate, directory, rejected)
    for rung in [*forms.rungs(requested, spec), FP32_RUNG]:
        if rung.weights is None:  # a float rung: ONNX Runtime holds it in FP32, 4 bytes a parameter
            _check_float_fits(job.source.checkpoint, rung, ladder.attempts)
        path = ladder.candidate()
        rung.write(job.source, path, job.awq_scales)
        found = agreement(job.reference, score_all(RunnerScorer(forms.gate_runner(path, job.facts)), job.prompts,
                                                   job.continuations))
        gate = judge((found.logits,), found.prompts * found.positions, spec.llm_gate)
        attempt = Attempt(rung.precision, rung.scheme, gate=gate, agreement=found)
        if rung is FP32_RUNG and not attempt.passed:
            raise BuildError(f"llm: the FP32 graph written from the checkpoint differs from PyTorch ({found.summary()}; "
                             f"{gate.summary()})")
        if ladder.record(attempt):
            return _settled(LLM.name, requested, ladder, 0, len(job.prompts))
    raise AssertionError("the FP32 rung passes or raises")


def _check_float_fits(checkpoint: Path, rung: LlmRung, attempts: Sequence[Attempt]) -> None:
    """Stops the build with the numbers, rather than the machine running out of memory, when the integer rungs failed
    and the float one does not fit (the pre-flight counted on the requested precision)."""
    needed = estimate(sorted(checkpoint.glob("*.safetensors")), checkpoint, rung.precision, quantized=True)
    if needed.peak_ram > needed.available_ram:
        tried = "; ".join(f"{a.label()}: {a.agreement.summary() if a.agreement else 'failed'}" for a in attempts)
        raise BuildError(f"llm: every integer rung failed the LLM gate ({tried}), and its {rung.precision} graph needs "
                         f"about {needed.peak_ram / 1e9:.1f} GB of RAM to gate, {needed.available_ram / 1e9:.1f} GB "
                         "available: build on a larger machine, or set quantize.llm_gate to what this checkpoint reaches")


def _settled(component: str, requested: str, ladder: _Ladder, calibration: int, holdout: int, fp32: Path | None = None) -> Settled:
    """Keeps the passing candidate as ``model.onnx`` (FP32: the export's own file) and drops the rest."""
    final = ladder.directory / "model.onnx"
    if fp32 is None:
        move_onnx(ladder.directory / f"candidate-{len(ladder.attempts) - 1}.onnx", final)
    for rejected in ladder.directory.glob("candidate-*.onnx"):
        remove_onnx(rejected)
    attempts = tuple(ladder.attempts)
    settled = Settled(component, requested, attempts[-1].precision, fp32 or final, calibration, holdout, attempts)
    (ladder.directory / "quantize.json").write_text(json.dumps(settled.to_json(), indent=2))
    return settled
