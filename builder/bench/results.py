"""Measured points as plain rows: from perf_analyzer's CSV and profile export, or from timed baseline calls."""

from __future__ import annotations

import csv
import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The profile export embeds request inputs verbatim (PNG/WAV bytes too), so it is not always valid
# JSON: only the timestamps are read, with patterns that cannot match inside base64 or binary input.
_REQUEST_START = re.compile(rb'\{"timestamp":(\d+),"request_inputs":')
_RESPONSE_TIMES = re.compile(rb'"response_timestamps":\[([\d,]*)\],"response_outputs":')


@dataclass(frozen=True)
class Row:
    series: str  # e.g. "served (mixed)", "in-process (mixed)", "HF eager (mixed)", "vision_encoder"
    concurrency: int
    requests_per_s: float
    tokens_per_s: float | None
    p50_ms: float
    p95_ms: float
    p99_ms: float
    ttft_ms: float | None = None  # p50 time to first token
    itl_ms: float | None = None  # mean inter-token latency
    stable: bool = True


def perf_analyzer_row(series: str, csv_path: Path, tokens_per_request: float | None, stable: bool) -> Row:
    """The one concurrency point in a perf_analyzer ``-f`` CSV (latencies there are in microseconds)."""
    with open(csv_path, newline="") as f:
        (record,) = list(csv.DictReader(f))
    rps = float(record["Inferences/Second"])
    return Row(
        series, int(record["Concurrency"]), rps, None if tokens_per_request is None else rps * tokens_per_request,
        *(float(record[f"p{q} latency"]) / 1000 for q in (50, 95, 99)), stable=stable,
    )


@dataclass(frozen=True)
class StreamTimes:
    ttft_ms: list[float]
    itl_ms: list[float]


def stream_times(profile: Path, tokens_per_request: float) -> StreamTimes:
    """Per request: first response minus send time (TTFT); time per token after the first (ITL).

    ``ensemble_stream`` sends the first token alone, then the tokens chosen in each
    ``triton.stream_interval_ms``, then an empty final response, so the token responses are all but
    the last and the ITL is their span over the tokens after the first.
    """
    raw = profile.read_bytes()
    starts = [int(m) for m in _REQUEST_START.findall(raw)]
    responses = [[int(t) for t in m.split(b",") if t] for m in _RESPONSE_TIMES.findall(raw)]
    if len(starts) != len(responses) or not starts:
        raise ValueError(f"{profile}: {len(starts)} requests but {len(responses)} response lists")
    ttft, itl = [], []
    for start, times in zip(starts, responses):
        tokens = times[:-1]
        ttft.append((times[0] - start) / 1e6)
        if len(tokens) > 1 and tokens_per_request > 1:
            itl.append((tokens[-1] - tokens[0]) / (tokens_per_request - 1) / 1e6)
    return StreamTimes(ttft, itl)


def with_stream_times(row: Row, times: StreamTimes) -> Row:
    return dataclasses.replace(row, ttft_ms=float(np.median(times.ttft_ms)),
                               itl_ms=float(np.mean(times.itl_ms)) if times.itl_ms else None)


def sequential_row(series: str, latencies_s: Sequence[float], tokens: Sequence[int], ttft_s: Sequence[float] = ()) -> Row:
    """A baseline called one request at a time: throughput is the inverse of its mean latency."""
    ms = np.asarray(latencies_s) * 1000
    total = float(np.sum(latencies_s))
    return Row(
        series, 1, len(ms) / total, float(np.sum(tokens)) / total,
        *(float(np.percentile(ms, q)) for q in (50, 95, 99)),
        ttft_ms=float(np.median(ttft_s)) * 1000 if len(ttft_s) else None,
    )


def write_rows(path: Path, rows: Sequence[Row]) -> None:
    fields = [f.name for f in dataclasses.fields(Row)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)

