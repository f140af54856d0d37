"""The accuracy gate: a quantized graph against its FP32 graph, per output, on held-out inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from builder.compare import cosine
from builder.spec import GateSpec


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

    def summary(self) -> str:
        w = self.worst
        verdict = "pass" if self.passed else "FAIL: " + "; ".join(self.failures)
        return (f"{w.name} cos {w.cosine:.5f}, max|err| {w.max_abs_error:.3g}, mean|err| {w.mean_abs_error:.3g} "
                f"over {self.samples} held-out inputs: {verdict}")


Feeds = dict[str, np.ndarray]


def session(path: Path) -> ort.InferenceSession:
    """Default optimizations, as the server runs it: fused INT8 kernels differ from the Q/DQ reference math."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def measure(reference: Sequence[Sequence[np.ndarray]], candidate: Path, feeds: Sequence[Feeds], names: Sequence[str]) -> tuple[OutputFigures, ...]:
    """``reference[i]`` holds the FP32 outputs ``names`` for ``feeds[i]``."""
    sess = session(candidate)
    cos = {n: 1.0 for n in names}
    max_err = {n: 0.0 for n in names}
    mean_err = {n: 0.0 for n in names}
    for want, feed in zip(reference, feeds):
        for name, got, expected in zip(names, sess.run(list(names), feed), want):
            if not expected.size:
                continue
            diff = np.abs(got.astype(np.float64) - expected)
            cos[name] = min(cos[name], cosine(got, expected))
            max_err[name] = max(max_err[name], float(diff.max()))
            mean_err[name] = max(mean_err[name], float(diff.mean()))
    return tuple(OutputFigures(n, cos[n], max_err[n], mean_err[n]) for n in names)


def judge(figures: tuple[OutputFigures, ...], samples: int, spec: GateSpec) -> GateResult:
    failures = []
    for f in figures:
        if f.cosine < spec.min_cosine:
            failures.append(f"{f.name} cos {f.cosine:.5f} < {spec.min_cosine}")
        if spec.max_abs_error is not None and f.max_abs_error > spec.max_abs_error:
            failures.append(f"{f.name} max|err| {f.max_abs_error:.3g} > {spec.max_abs_error}")
        if spec.max_mean_abs_error is not None and f.mean_abs_error > spec.max_mean_abs_error:
            failures.append(f"{f.name} mean|err| {f.mean_abs_error:.3g} > {spec.max_mean_abs_error}")
    return GateResult(samples, figures, tuple(failures))
