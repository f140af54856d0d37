"""One decode step of the repository's LLM graph taken apart, in this process: its time, and with ONNX
Runtime's own profiler the share of each op type's kernels and of the Python around the run (each
sequence's KV cache padded into the batch). Beside the served step times, it says where a step's time
goes and how far it is from the floor the machine allows."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder.runtime.generation import LanguageModelRunner, SamplingParams, Sequence
from builder.runtime.model_facts import ModelFacts

WARMUP_STEPS = 2


@dataclass(frozen=True)
class StepBreakdown:
    batch: int
    context: int  # positions in the longest sequence's cache at the first timed step
    decode_ms: float  # the runner's whole decode() call, median, without the profiler
    # Shares of decode() under the profiler (they add up to 1):
    op_shares: dict[str, float]  # each op type's kernels, largest first
    session_share: float  # the session run around its kernels
    python_share: float  # the Python around the run (the KV caches padded into a batch)


def profile_decode(graph: Path, facts: ModelFacts, prompts: list[np.ndarray], batch: int, steps: int = 8) -> StepBreakdown:
    """Decodes ``batch`` sequences (``prompts`` in turn) together: ``steps`` timed steps after a warm-up, then
    as many under the profiler."""
    runner = LanguageModelRunner(str(graph), facts)
    sequences = _start(runner, prompts, batch, steps)
    context = max(s.length for s in sequences) + WARMUP_STEPS
    decode_ms = 1000 * statistics.median(_decode(runner, sequences, WARMUP_STEPS + steps)[WARMUP_STEPS:])
    del runner, sequences
    with tempfile.TemporaryDirectory() as tmp:
        runner = LanguageModelRunner(str(graph), facts, profile_prefix=str(Path(tmp) / "decode"))
        sequences = _start(runner, prompts, batch, steps)
        profiled_s = sum(_decode(runner, sequences, WARMUP_STEPS + steps)[WARMUP_STEPS:])
        events = json.loads(Path(runner.session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    timed = runs[-steps:]  # the prefills and the warm-up ran first
    ops: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= timed[0][0]:
            ops[e["args"]["op_name"]] += e["dur"] / 1e6  # microseconds
    run_s = sum(d for _, d in timed) / 1e6
    return StepBreakdown(batch, context, decode_ms, {op: t / profiled_s for op, t in ops.most_common()},
                         session_share=max(0.0, run_s - sum(ops.values())) / profiled_s,
                         python_share=max(0.0, profiled_s - run_s) / profiled_s)


def _start(runner: LanguageModelRunner, prompts: list[np.ndarray], batch: int, steps: int) -> list[Sequence]:
    params = SamplingParams(max_tokens=WARMUP_STEPS + steps + 2)
    sequences = []
    for row in range(batch):
        ids = prompts[row % len(prompts)]
        sequences.append(runner.start(ids, np.zeros((ids.size, runner.facts.hidden_size), np.float32),
                                      np.zeros(ids.size, bool), params))
    for seq in sequences:
        seq.next_token()
    return sequences


def _decode(runner: LanguageModelRunner, sequences: list[Sequence], steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        runner.decode(sequences)
        times.append(time.perf_counter() - start)
        for seq in sequences:
            seq.next_token()
    return times
