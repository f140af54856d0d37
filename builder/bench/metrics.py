"""Per-model request counts from the server's Prometheus endpoint: did every request succeed?"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass

# e.g. nv_inference_request_failure{model="llm",reason="BACKEND",version="1"} 0
_COUNTER = re.compile(r'^nv_inference_request_(success|failure)\{model="([^"]+)",[^}]*\} (\d+)', re.M)


@dataclass(frozen=True)
class RequestCounts:
    model: str
    success: int
    failure: int


def request_counts(host: str, metrics_port: int) -> list[RequestCounts]:
    with urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts: dict[str, dict[str, int]] = {}
    for kind, model, value in _COUNTER.findall(text):
        counts.setdefault(model, {"success": 0, "failure": 0})[kind] += int(value)
    return [RequestCounts(model, c["success"], c["failure"]) for model, c in sorted(counts.items())]
