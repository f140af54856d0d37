"""The decode model's metrics on Triton's own endpoint: counts that match what was served."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest

from builder.serve.client import Request, ask, ask_stream

pytestmark = pytest.mark.serving


def scrape(server) -> dict[str, float]:
    """``name`` -> value of every mmtb_ metric (labels dropped: one model reports them)."""
    text = urllib.request.urlopen(f"http://{server.host}:{server.metrics_port}/metrics", timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(mmtb_\w+)\{[^}]*\} (\S+)$", text, re.MULTILINE)}


def settled(server, want: dict[str, float], timeout: float = 10) -> dict[str, float]:
    """The metrics once they show ``want`` (they are published once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        found = scrape(server)
        if all(found.get(k) == v for k, v in want.items()) or time.monotonic() > deadline:
            return found
        time.sleep(0.25)


def test_tokens_requests_and_the_kv_gauges_are_reported(server, client, built_repository: Path) -> None:
    before = scrape(server)
    unary = [ask(client, Request(f"Count to {n}.", max_tokens=n)) for n in (3, 5)]
    streamed = [t for _, ids in ask_stream(client, Request("Count to 4.", max_tokens=4)) for t in ids]
    generated = sum(len(a.token_ids) for a in unary) + len(streamed)
    want = {"mmtb_generated_tokens_total": before.get("mmtb_generated_tokens_total", 0) + generated,
            "mmtb_requests_finished_total": before.get("mmtb_requests_finished_total", 0) + 3}
    after = settled(server, want)
    for name, value in want.items():
        assert after.get(name) == value, (name, after)
    assert after["mmtb_first_tokens_total"] - before.get("mmtb_first_tokens_total", 0) == 3
    assert after["mmtb_first_token_seconds_total"] > before.get("mmtb_first_token_seconds_total", 0)
    assert after["mmtb_prompt_tokens_total"] > before.get("mmtb_prompt_tokens_total", 0)
    assert after["mmtb_active_sequences"] == 0 and after["mmtb_kv_reserved_tokens"] == 0  # all answered
    assert after["mmtb_kv_budget_tokens"] > 0
    steps = after["mmtb_decode_steps_total"] - before.get("mmtb_decode_steps_total", 0)
    assert steps >= 4 and after["mmtb_decode_step_seconds_total"] > before.get("mmtb_decode_step_seconds_total", 0)
    assert after["mmtb_decode_step_sequences_total"] - before.get("mmtb_decode_step_sequences_total", 0) >= steps
