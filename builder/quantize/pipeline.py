"""The pipeline gate: the whole quantized pipeline against the FP32 one, per kind of request.

Per-component gates can each pass while their errors add up (INT8 encoders feeding an INT8 LLM).
So after them, held-out requests of every kind the model takes (text, +image, +audio, +both; never
calibration samples) run through both pipelines, teacher-forced over 32 positions of a fixed continuation
(:mod:`builder.quantize.agreement`); a quantized LLM's reference is the checkpoint in PyTorch. The
figures depend on the CPU's INT8 kernels (AVX2, AVX-512 VNNI, AMX round differently), so the CPU is
recorded beside them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder.compare import OutputFigures, onnxruntime_session
from builder.quantize.agreement import Agreement, LogitScorer, agreement, fuse_prompt
from builder.quantize.calibration_data import CalibrationFiles
from builder.runtime.model_facts import ModelFacts
from builder.runtime.preprocess import ModelInputs, Preprocessor
from builder.spec import PipelineGateSpec

# Flags that change how ONNX Runtime's INT8 and float kernels round.
_ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class KindFigures:
    kind: str  # text | text+image | text+audio | text+image+audio
    agreement: Agreement


@dataclass(frozen=True)
class PipelineFigures:
    kinds: tuple[KindFigures, ...]
    failures: tuple[str, ...]  # empty: passed

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def worst_agreement(self) -> float:
        return min(k.agreement.agreement for k in self.kinds)

    def summary(self) -> str:
        kinds = ", ".join(f"{k.kind} {k.agreement.agreement:.1%} (cos {k.agreement.logits.cosine:.4f})" for k in self.kinds)
        return f"{kinds}: {'passed' if self.passed else 'failed: ' + '; '.join(self.failures)}"


@dataclass(frozen=True)
class PipelineResult:
    """What the build settled on and why, for the report and the manifest."""

    figures: PipelineFigures
    precisions: dict[str, str]  # component -> precision used
    steps: tuple[str, ...]  # each fallback the gate caused, in order
    cpu: str
    rejected: dict[str, int]  # component -> passing rungs the gate turned down

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.figures.passed}

    @classmethod
    def from_json(cls, raw: dict) -> "PipelineResult":
        kinds = tuple(KindFigures(k["kind"], Agreement(**{**k["agreement"], "logits": OutputFigures(**k["agreement"]["logits"])}))
                      for k in raw["figures"]["kinds"])
        return cls(PipelineFigures(kinds, tuple(raw["figures"]["failures"])), raw["precisions"], tuple(raw["steps"]),
                   raw["cpu"], raw["rejected"])


def held_out_requests(files: CalibrationFiles, preprocess: Preprocessor, facts: ModelFacts) -> dict[str, ModelInputs]:
    """One held-out request per kind the model takes, from the files after the calibration ones."""
    start = files.samples
    prompts = files.prompts[start:]
    images = files.images[start:] if facts.image else ()
    audio = files.audio[start:] if facts.audio else ()
    kinds = {"text": ([], [])}
    if images:
        kinds["text+image"] = ([images[0]], [])
    if audio:
        kinds["text+audio"] = ([], [audio[0]])
    if images and audio:
        kinds["text+image+audio"] = ([images[-1]], [audio[-1]])
    return {kind: preprocess(prompts[i % len(prompts)], [p.read_bytes() for p in pictures], [p.read_bytes() for p in clips])
            for i, (kind, (pictures, clips)) in enumerate(kinds.items())}


class PipelineGate:
    """The reference pipeline's figures on the held-out requests, computed once: the FP32 encoders (``encoders``:
    component -> graph) and the reference LLM (``reference_llm``: made when needed, dropped after, since a quantized
    LLM's reference is the checkpoint in PyTorch). :meth:`measure` then judges a candidate pipeline against them."""

    def __init__(self, encoders: Mapping[str, Path], reference_llm: Callable[[], LogitScorer],
                 requests: Mapping[str, ModelInputs], continuations: Sequence[np.ndarray], facts: ModelFacts,
                 gate: PipelineGateSpec) -> None:
        self.requests, self.facts, self.gate, self.reference_llm = requests, facts, gate, reference_llm
        self.continuations = dict(zip(requests, continuations, strict=True))
        sessions = {name: onnxruntime_session(path) for name, path in encoders.items()}
        self.prompts = {kind: fuse_prompt(inputs, sessions, facts) for kind, inputs in requests.items()}
        llm = reference_llm()
        self.logits = {kind: llm.score(prompt, self.continuations[kind]) for kind, prompt in self.prompts.items()}

    def measure(self, encoders: Mapping[str, Path], llm: LogitScorer | None) -> PipelineFigures:
        """The pipeline of ``encoders`` (component -> graph) and ``llm`` (None: the reference LLM) against the
        reference, per kind of request."""
        sessions = {name: onnxruntime_session(path) for name, path in encoders.items()}
        scorer = llm if llm is not None else self.reference_llm()
        kinds = tuple(
            KindFigures(kind, agreement([self.logits[kind]],
                                        [scorer.score(fuse_prompt(inputs, sessions, self.facts), self.continuations[kind])]))
            for kind, inputs in self.requests.items()
        )
        gate = self.gate
        failures = [f"{k.kind}: agreement {k.agreement.agreement:.1%} < {gate.min_agreement:.0%}"
                    for k in kinds if k.agreement.agreement < gate.min_agreement]
        if gate.min_cosine is not None:
            failures += [f"{k.kind}: logits cos {k.agreement.logits.cosine:.5f} < {gate.min_cosine}"
                         for k in kinds if k.agreement.logits.cosine < gate.min_cosine]
        return PipelineFigures(kinds, tuple(failures))


def cpu_description() -> str:
    """Model name and the ISA flags that matter for INT8 kernels, from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    present = [flag for flag in _ISA_FLAGS if flag in flags]
    return f"{name.group(1).strip() if name else 'unknown CPU'} ({', '.join(present) or 'no AVX2'})"
