"""From the server's Prometheus endpoint: per-model request counts (did every request succeed?) and the
decode model's own counters (where its time went)."""

from __future__ import annotations

import re
import time
import urllib.request
from dataclasses import dataclass, fields

# e.g. nv_inference_request_failure{model="llm",reason="BACKEND",version="1"} 0
_COUNTER = re.compile(r'^nv_inference_request_(success|failure)\{model="([^"]+)",[^}]*\} (\d+)', re.M)
_DECODE = re.compile(r'^mmtb_(\w+)_total\{model="llm"\} (\S+)$', re.M)  # builder/runtime/triton_metrics.py


@dataclass(frozen=True)
class RequestCounts:
    model: str
    success: int
    failure: int


@dataclass(frozen=True)
class DecodeCounters:
    """The decode model's running totals (``llm`` publishes them once a second)."""

    steps: float
    step_seconds: float
    step_sequences: float
    prefill_seconds: float

    def __sub__(self, before: DecodeCounters) -> DecodeCounters:
        return DecodeCounters(*(getattr(self, f.name) - getattr(before, f.name) for f in fields(self)))


def _exposition(host: str, metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=10) as response:
        return response.read().decode()


def decode_counters(host: str, metrics_port: int) -> DecodeCounters:
    """The counters as of now: waits out one publishing interval of ``llm`` (once a second) first."""
    time.sleep(1.1)
    found = {name: float(value) for name, value in _DECODE.findall(_exposition(host, metrics_port))}
    return DecodeCounters(found.get("decode_steps", 0.0), found.get("decode_step_seconds", 0.0),
                          found.get("decode_step_sequences", 0.0), found.get("prefill_seconds", 0.0))


def request_counts(host: str, metrics_port: int) -> list[RequestCounts]:
    text = _exposition(host, metrics_port)
    counts: dict[str, dict[str, int]] = {}
    for kind, model, value in _COUNTER.findall(text):
        counts.setdefault(model, {"success": 0, "failure": 0})[kind] += int(value)
    return [RequestCounts(model, c["success"], c["failure"]) for model, c in sorted(counts.items())]
