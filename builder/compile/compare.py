"""Compares a compiled model with ONNX Runtime FP32 on the same inputs, through Polygraphy's ``Comparator``.

The candidate is any Polygraphy runner: a ``TrtRunner`` on the build server, an ``OnnxrtRunner``
in the CPU tests. Both gate figures (min cosine, max |error|) come from Polygraphy's compare
functions, so the numbers match what ``polygraphy run --trt --onnxrt`` prints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.comparator import Comparator
from polygraphy.comparator.compare import CosineSimilarityCompareFunc, SimpleCompareFunc
from polygraphy.logger import G_LOGGER

from builder.compile.profiles import InputShapes
from builder.errors import BuildError
from builder.export.graph import TensorSig

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class AccuracyGate:
    min_cosine: float
    max_abs_error: float | None = None  # None: reported, not gated


@dataclass(frozen=True)
class Comparison:
    samples: int
    min_cosine: float
    max_abs_error: float
    passed: bool


def sample_feeds(inputs: tuple[TensorSig, ...], shapes: Mapping[str, InputShapes], vocab: int, seed: int) -> Feeds:
    """Inputs at each profile's opt shape. The LLM's integer inputs get values it can meet
    (token ids below the vocabulary size, a full attention mask, positions after the past)."""
    rng = np.random.default_rng(seed)
    feeds: Feeds = {}
    for sig in inputs:
        shape = shapes[sig.name].opt
        if sig.name == "attention_mask":
            feeds[sig.name] = np.ones(shape, dtype=np.int64)
        elif sig.name == "position_ids":
            start = shapes["attention_mask"].opt[-1] - shape[-1]
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


def compare_with_onnxruntime(candidate: BaseRunner, reference_onnx: Path, feeds: list[Feeds], gate: AccuracyGate) -> Comparison:
    """Runs ``candidate`` and ONNX Runtime (CPU, FP32 graph) on ``feeds`` and scores every output."""
    reference = OnnxrtRunner(SessionFromOnnx(str(reference_onnx), providers=["cpu"]), name="onnxruntime-fp32")
    with G_LOGGER.verbosity(G_LOGGER.ERROR):  # Polygraphy reports each step at INFO
        results = Comparator.run([candidate, reference], data_loader=feeds)
        atol = math.inf if gate.max_abs_error is None else gate.max_abs_error
        accuracy = Comparator.compare_accuracy(
            results, compare_func=[SimpleCompareFunc(atol=atol, rtol=0.0), CosineSimilarityCompareFunc(gate.min_cosine)],
        )
    simple, cosine = ([out for iteration in _only_pair(result) for out in iteration.values()] for result in accuracy)
    return Comparison(
        len(feeds), min(float(out.cosine_similarity) for out in cosine), max(float(out.max_absdiff) for out in simple),
        bool(accuracy),
    )


def _only_pair(result: Mapping[Any, list[Mapping[str, Any]]]) -> list[Mapping[str, Any]]:
    (iterations,) = result.values()  # two runners: one pair
    return iterations
