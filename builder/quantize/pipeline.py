"""The pipeline gate: the whole quantized pipeline against the FP32 one, per kind of request.

Per-component gates can each pass while their errors add up (INT8 encoders feeding an INT8 LLM).
So after them, held-out requests of every kind the model takes (text, +image, +audio, +both; never
calibration samples) run through both pipelines, teacher-forced over the first 32 positions. The
figures depend on the CPU's INT8 kernels (AVX2, AVX-512 VNNI, AMX round differently), so the CPU is
recorded beside them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from builder.compare import OutputFigures, onnxruntime_session
from builder.components import LLM
from builder.quantize.agreement import Agreement, fuse_prompt, teacher_forced
from builder.quantize.calibration_data import CalibrationFiles
from builder.runtime.generation import SequenceRunner
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


def measure_pipeline(reference: Mapping[str, Path], candidate: Mapping[str, Path], requests: Mapping[str, ModelInputs],
                     facts: ModelFacts, gate: PipelineGateSpec,
                     llm_runner: Callable[[Path, ModelFacts], SequenceRunner]) -> PipelineFigures:
    """``reference``/``candidate`` map component -> graph (vision_encoder, audio_encoder, llm); ``llm_runner``: the
    LLM backend's gate runner."""
    def pipeline(graphs: Mapping[str, Path]) -> tuple[dict, SequenceRunner]:
        encoders = {name: onnxruntime_session(path) for name, path in graphs.items() if name != LLM.name}
        return encoders, llm_runner(graphs[LLM.name], facts)

    (ref_encoders, ref_llm), (cand_encoders, cand_llm) = pipeline(reference), pipeline(candidate)
    kinds = tuple(
        KindFigures(kind, teacher_forced(ref_llm, cand_llm, [(fuse_prompt(inputs, ref_encoders, facts),
                                                              fuse_prompt(inputs, cand_encoders, facts))]))
        for kind, inputs in requests.items()
    )
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
