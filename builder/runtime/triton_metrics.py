"""The decode model's own metrics on Triton's metrics endpoint (:8002/metrics), beside Triton's.

Counters and gauges through the Python backend's custom metrics API, published from the scheduler's
running totals once a second (not per token: each update is a message to the server process).
Imported only inside Triton. Average TTFT is ``rate(mmtb_first_token_seconds_total) /
rate(mmtb_first_tokens_total)``; tokens/s is ``rate(mmtb_generated_tokens_total)``; inter-token
latency is ``rate(mmtb_decode_step_seconds_total) / rate(mmtb_decode_steps_total)`` and the mean
decode batch ``rate(mmtb_decode_step_sequences_total) / rate(mmtb_decode_steps_total)``.
Refusals are counted where they happen, by every model: ``mmtb_requests_refused_total{model, reason}``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import triton_python_backend_utils as pb_utils

if TYPE_CHECKING:  # the preprocess and encoder models count refusals without loading the decoder's modules
    from .prefix_cache import PrefixCache
    from .scheduler import DecodeScheduler

INTERVAL_S = 1.0
COUNTERS = {  # metric -> (help, what it counts)
    "mmtb_requests_finished_total": ("Answers completed by the decode model", lambda s, c: s.stats.finished),
    "mmtb_requests_failed_total": ("Answers that failed while decoding", lambda s, c: s.stats.failed),
    "mmtb_requests_cancelled_total": ("Answers stopped because their client went away", lambda s, c: s.stats.cancelled),
    "mmtb_prompt_tokens_total": ("Prompt tokens prefilled (placeholders included)", lambda s, c: s.stats.prompt_tokens),
    "mmtb_generated_tokens_total": ("Tokens generated", lambda s, c: s.stats.generated_tokens),
    "mmtb_first_token_seconds_total": ("Arrival at the decode model to first token, summed", lambda s, c: s.stats.first_token_seconds),
    "mmtb_first_tokens_total": ("First tokens produced (the count for the sum above)", lambda s, c: s.stats.first_tokens),
    "mmtb_prefill_seconds_total": ("Time in prefills (between decode steps), summed", lambda s, c: s.stats.prefill_seconds),
    "mmtb_prefix_cache_reused_tokens_total": ("Prompt positions whose KV came from the prefix cache",
                                              lambda s, c: c.reused_tokens if c else 0),
    "mmtb_decode_steps_total": ("Batched decode steps (each gives its sequences one token)", lambda s, c: s.stats.decode_steps),
    "mmtb_decode_step_seconds_total": ("Time in decode steps, summed", lambda s, c: s.stats.decode_seconds),
    "mmtb_decode_step_sequences_total": ("Sequences per decode step, summed", lambda s, c: s.stats.decode_sequences),
}
GAUGES = {
    "mmtb_active_sequences": ("Sequences decoding now", lambda s, c: len(s.active)),
    "mmtb_waiting_requests": ("Requests waiting for room in the KV budget", lambda s, c: len(s.waiting)),
    "mmtb_kv_reserved_tokens": ("KV positions reserved by the active sequences", lambda s, c: s.reserved),
    "mmtb_kv_budget_tokens": ("KV positions the budget allows", lambda s, c: s.budget.tokens if s.budget else 0),
    "mmtb_prefix_cache_bytes": ("Bytes held by the prefix cache", lambda s, c: c.size_bytes if c else 0),
}


class MetricsPublisher:
    def __init__(self, scheduler: DecodeScheduler, prefix_cache: PrefixCache | None, model: str) -> None:
        self.scheduler, self.prefix_cache = scheduler, prefix_cache
        labels = {"model": model}
        # A MetricFamily must outlive its Metric objects: both are kept.
        self.families: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        for names, kind in ((COUNTERS, pb_utils.MetricFamily.COUNTER), (GAUGES, pb_utils.MetricFamily.GAUGE)):
            for name, (description, _) in names.items():
                self.families[name] = pb_utils.MetricFamily(name=name, description=description, kind=kind)
                self.metrics[name] = self.families[name].Metric(labels=labels)
        self.published = dict.fromkeys(COUNTERS, 0.0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()

    def _loop(self) -> None:
        while not self.stop.wait(INTERVAL_S):
            self.publish()

    def publish(self) -> None:
        s, c = self.scheduler, self.prefix_cache
        for name, (_, read) in COUNTERS.items():
            value = float(read(s, c))
            if value > self.published[name]:
                self.metrics[name].increment(value - self.published[name])
                self.published[name] = value
        for name, (_, read) in GAUGES.items():
            self.metrics[name].set(float(read(s, c)))


REFUSED = "mmtb_requests_refused_total"
REFUSAL_REASONS = ("invalid_argument", "busy")  # a request the client can fix; no room for it now (retry)
_refusals: dict[tuple[str, str], Any] = {}
_refusal_family: list[Any] = []  # created on first use (a family must be made inside a running model)


def count_refusal(model: str, reason: str) -> None:
    """One more request refused by ``model``: counted once, by the model that refused it (a caller that
    forwards the error does not count it again)."""
    if not _refusal_family:
        _refusal_family.append(pb_utils.MetricFamily(
            name=REFUSED, description="Requests refused, by the model that refused them and why",
            kind=pb_utils.MetricFamily.COUNTER))
    key = (model, reason)
    if key not in _refusals:
        _refusals[key] = _refusal_family[0].Metric(labels={"model": model, "reason": reason})
    _refusals[key].increment(1.0)
