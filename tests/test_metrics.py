"""The decode model's metrics on Triton's own endpoint: counts that match what was served."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest

from tritonclient.utils import InferenceServerException

from builder.serve.client import Request, ask, ask_stream

pytestmark = pytest.mark.serving


def exposition(server) -> str:
    return urllib.request.urlopen(f"http://{server.host}:{server.metrics_port}/metrics", timeout=10).read().decode()


def scrape(server) -> dict[str, float]:
    """``name`` -> value of every mmtb_ metric the decode model publishes (labels dropped: one model reports them)."""
    found = re.finditer(r'^(mmtb_\w+)\{model="llm"\} (\S+)$', exposition(server), re.MULTILINE)
    return {m.group(1): float(m.group(2)) for m in found}


def refusals(server) -> dict[tuple[str, str], float]:
    """(model, reason) -> requests refused."""
    found = re.finditer(r'^mmtb_requests_refused_total\{(?=[^}]*model="(\w+)")(?=[^}]*reason="(\w+)")[^}]*\} (\S+)$',
                        exposition(server), re.MULTILINE)
    return {(m.group(1), m.group(2)): float(m.group(3)) for m in found}


PUBLISH_INTERVAL_S = 1.0  # builder.runtime.triton_metrics.INTERVAL_S (that module imports Triton's own utils)


def settled(server, want: dict[str, float], timeout: float = 10) -> dict[str, float]:
    """The metrics once they show ``want`` and a publish interval later still show the same: the publisher sets one
    metric after another, so a scrape can land between two of one round (a busy machine widens that)."""
    deadline = time.monotonic() + timeout
    while True:
        found = scrape(server)
        if all(found.get(k) == v for k, v in want.items()):
            time.sleep(PUBLISH_INTERVAL_S * 1.5)
            again = scrape(server)
            if again == found or time.monotonic() > deadline:
                return again
        elif time.monotonic() > deadline:
            return found
        else:
            time.sleep(0.25)


def idle(server) -> dict[str, float]:
    """The metrics once nothing decodes and the last answers are counted (nothing changed over a publish interval)."""
    return settled(server, {"mmtb_active_sequences": 0})


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
    assert after["mmtb_prefill_seconds_total"] > before.get("mmtb_prefill_seconds_total", 0)
    assert after["mmtb_active_sequences"] == 0 and after["mmtb_kv_reserved_tokens"] == 0  # all answered
    assert after["mmtb_kv_budget_tokens"] > 0
    steps = after["mmtb_decode_steps_total"] - before.get("mmtb_decode_steps_total", 0)
    assert steps >= 4 and after["mmtb_decode_step_seconds_total"] > before.get("mmtb_decode_step_seconds_total", 0)
    assert after["mmtb_decode_step_sequences_total"] - before.get("mmtb_decode_step_sequences_total", 0) >= steps


def test_refusals_are_counted_by_the_model_that_refused_and_why(server, client) -> None:
    before = refusals(server)
    bad = [Request("What is this?", images=(b"not an image",)),  # preprocess: a broken image
           Request("Hi", max_tokens=10**6)]  # llm: over the max_tokens cap
    for request in bad:
        with pytest.raises(InferenceServerException) as raised:
            ask(client, request)
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT", raised.value.message()
    with pytest.raises(InferenceServerException):
        [_ for _ in ask_stream(client, Request("Hi", max_tokens=10**6))]  # refused by llm, forwarded by ensemble_stream
    after = refusals(server)
    moved = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert moved == {("preprocess", "invalid_argument"): 1, ("llm", "invalid_argument"): 2}, after
