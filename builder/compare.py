"""Comparing a candidate's outputs with a reference's, and judging them against a gate: the one module
export parity, the quantization gates and the TensorRT comparison use. Runs and per-output figures
come from Polygraphy (``Comparator``, ``SimpleCompareFunc``, ``CosineSimilarityCompareFunc``), so the
numbers match what ``polygraphy run`` prints; the gate and its verdict are ours.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import onnxruntime as ort

Outputs = Mapping[str, Any]  # output name -> array (numpy, or a torch tensor)
Feeds = dict[str, np.ndarray]


class Gate(Protocol):
    """What a comparison is judged by (the spec's GateSpec and LlmGateSpec)."""

    min_cosine: float
    max_abs_error: float | None  # None: reported, not gated
    max_mean_abs_error: float | None


@dataclass(frozen=True)
class OutputFigures:
    name: str
    cosine: float  # the lowest over the samples
    max_abs_error: float
    mean_abs_error: float  # the largest over the samples


@dataclass(frozen=True)
class GateResult:
    samples: int
    outputs: tuple[OutputFigures, ...]
    failures: tuple[str, ...]  # why it failed; empty if it passed

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def worst(self) -> OutputFigures:
        return min(self.outputs, key=lambda o: o.cosine)

    @property
    def max_abs_error(self) -> float:
        return max(o.max_abs_error for o in self.outputs)

    def summary(self) -> str:
        w = self.worst
        verdict = "pass" if self.passed else "FAIL: " + "; ".join(self.failures)
        return (f"{w.name} cos {w.cosine:.5f}, max|err| {w.max_abs_error:.3g}, mean|err| {w.mean_abs_error:.3g} "
                f"over {self.samples} held-out inputs: {verdict}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GateResult:
        return cls(data["samples"], tuple(OutputFigures(**o) for o in data["outputs"]), tuple(data["failures"]))


def figures(candidate: Sequence[Outputs], reference: Sequence[Outputs], names: Sequence[str]) -> tuple[OutputFigures, ...]:
    """Per output over all samples (``candidate[i]`` against ``reference[i]``): the lowest cosine and
    the largest max and mean |error|, from Polygraphy's compare functions. Empty outputs (a request
    without images) are skipped; an output of another shape is an error."""
    from polygraphy.comparator import Comparator, IterationResult, RunResults
    from polygraphy.comparator.compare import CosineSimilarityCompareFunc, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    def kept(outputs: Outputs, other: Outputs) -> dict[str, Any]:
        found = {}
        for name in names:
            if tuple(outputs[name].shape) != tuple(other[name].shape):
                raise ValueError(f"output {name}: shape {tuple(outputs[name].shape)} against {tuple(other[name].shape)}")
            if math.prod(outputs[name].shape):
                found[name] = outputs[name]
        return found

    pairs = [(kept(c, r), kept(r, c)) for c, r in zip(candidate, reference, strict=True)]
    results = RunResults([
        ("candidate", [IterationResult(c, runner_name="candidate") for c, _ in pairs]),
        ("reference", [IterationResult(r, runner_name="reference") for _, r in pairs]),
    ])
    cos = {n: 1.0 for n in names}
    max_err = {n: 0.0 for n in names}
    mean_err = {n: 0.0 for n in names}
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # Polygraphy reports every output at INFO
        simple, similarity = Comparator.compare_accuracy(
            results, compare_func=[SimpleCompareFunc(atol=math.inf, rtol=math.inf), CosineSimilarityCompareFunc(-1.0)])
    for iteration in _iterations(simple):
        for name, out in iteration.items():
            max_err[name] = max(max_err[name], float(out.max_absdiff))
            mean_err[name] = max(mean_err[name], float(out.mean_absdiff))
    for iteration in _iterations(similarity):
        for name, out in iteration.items():
            cos[name] = min(cos[name], float(out.cosine_similarity))
    return tuple(OutputFigures(n, cos[n], max_err[n], mean_err[n]) for n in names)


def judge(found: tuple[OutputFigures, ...], samples: int, gate: Gate) -> GateResult:
    failures = []
    for f in found:
        if not f.cosine >= gate.min_cosine:  # NaN fails
            failures.append(f"{f.name} cos {f.cosine:.5f} < {gate.min_cosine}")
        if gate.max_abs_error is not None and not f.max_abs_error <= gate.max_abs_error:
            failures.append(f"{f.name} max|err| {f.max_abs_error:.3g} > {gate.max_abs_error}")
        if gate.max_mean_abs_error is not None and not f.mean_abs_error <= gate.max_mean_abs_error:
            failures.append(f"{f.name} mean|err| {f.mean_abs_error:.3g} > {gate.max_mean_abs_error}")
    return GateResult(samples, found, tuple(failures))


def onnxruntime_session(path: Path) -> ort.InferenceSession:
    """Default optimizations, as the server runs it: fused INT8 kernels differ from the Q/DQ reference math."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnxruntime(path: Path, feeds: Sequence[Feeds], names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """``path``'s outputs ``names`` for each of ``feeds``, with ONNX Runtime on the CPU."""
    session = onnxruntime_session(path)
    return [dict(zip(names, session.run(list(names), feed), strict=True)) for feed in feeds]


def _iterations(result: Mapping[Any, list[Mapping[str, Any]]]) -> list[Mapping[str, Any]]:
    (iterations,) = result.values()  # two runs: one pair
    return iterations
