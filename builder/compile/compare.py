"""Inputs for comparing a compiled model with ONNX Runtime FP32, and the run of that comparison.

The candidate is any Polygraphy runner: a ``TrtRunner`` on the build server, an ``OnnxrtRunner``
in the CPU tests. Both run through Polygraphy's ``Comparator``; figures and verdict come from
:mod:`builder.compare`, as for the export and quantize stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.comparator import Comparator
from polygraphy.logger import G_LOGGER

from builder.compare import Feeds, Gate, GateResult, Outputs, figures, judge
from builder.compile.profiles import InputShapes
from builder.errors import BuildError
from builder.export.graph import TensorSig
from builder.runtime.contract import ATTENTION_MASK, POSITION_IDS


def sample_feeds(inputs: tuple[TensorSig, ...], shapes: Mapping[str, InputShapes], vocab: int, seed: int) -> Feeds:
    """Inputs at each profile's opt shape. The LLM's integer inputs get values it can meet
    (token ids below the vocabulary size, a full attention mask, positions after the past)."""
    rng = np.random.default_rng(seed)
    feeds: Feeds = {}
    for sig in inputs:
        shape = shapes[sig.name].opt
        if sig.name == ATTENTION_MASK:
            feeds[sig.name] = np.ones(shape, dtype=np.int64)
        elif sig.name == POSITION_IDS:
            start = shapes[ATTENTION_MASK].opt[-1] - shape[-1]
            feeds[sig.name] = np.broadcast_to(np.arange(start, start + shape[-1], dtype=np.int64), shape).copy()
        elif sig.data_type == "TYPE_INT64":
            feeds[sig.name] = rng.integers(0, vocab, shape, dtype=np.int64)
        elif sig.data_type == "TYPE_BOOL":
            feeds[sig.name] = rng.random(shape) > 0.5
        elif sig.data_type in ("TYPE_FP32", "TYPE_FP16"):
            feeds[sig.name] = rng.standard_normal(shape).astype(np.float16 if sig.data_type == "TYPE_FP16" else np.float32)
        else:
            raise BuildError(f"cannot make comparison inputs for {sig.name} of type {sig.data_type}")
    return feeds


def compare_with_onnxruntime(candidate: BaseRunner, reference_onnx: Path, feeds: Sequence[Feeds], gate: Gate) -> GateResult:
    """Runs ``candidate`` and ONNX Runtime (CPU, FP32 graph) on ``feeds`` and judges every output."""
    return judge_runs([run_with_onnxruntime(candidate, reference_onnx, feeds)], gate)


def run_with_onnxruntime(candidate: BaseRunner, reference_onnx: Path, feeds: Sequence[Feeds]) -> tuple[list[Outputs], list[Outputs]]:
    """The candidate's and ONNX Runtime's outputs for each of ``feeds``, through Polygraphy's ``Comparator``."""
    reference = OnnxrtRunner(SessionFromOnnx(str(reference_onnx), providers=["cpu"]), name="onnxruntime-fp32")
    with G_LOGGER.verbosity(G_LOGGER.ERROR):  # Polygraphy reports each step at INFO
        results = Comparator.run([candidate, reference], data_loader=list(feeds))
    (_, candidate_outputs), (_, reference_outputs) = results.items()
    return [{k: i[k] for k in i} for i in candidate_outputs], [{k: i[k] for k in i} for i in reference_outputs]


def judge_runs(runs: Sequence[tuple[Sequence[Outputs], Sequence[Outputs]]], gate: Gate) -> GateResult:
    """One verdict over several runs (e.g. one per optimization profile)."""
    candidate = [out for run, _ in runs for out in run]
    reference = [out for _, run in runs for out in run]
    return judge(figures(candidate, reference, list(reference[0])), len(reference), gate)
