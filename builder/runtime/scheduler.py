"""Continuous batching: concurrent requests decode together, one graph call per step for all of them.

The ``llm`` model hands each request to a :class:`DecodeScheduler` and returns at once, so Triton
delivers the next requests while earlier ones are still decoding. A background thread prefills
newcomers, then advances every active sequence by one token in a single batched call. With a
:class:`KvBudget`, a request is admitted only when its KV fits beside the others'; until then it
waits in order, and is refused (server busy) when it has waited too long: memory stays bounded
however many requests arrive. A job whose client went away (``is_cancelled``) leaves at the next step
boundary, giving back its KV reservation and batch slot.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import RequestError, ServerBusy
from .generation import SamplingParams, Sequence, SequenceRunner


@dataclass
class DecodeJob:
    input_ids: np.ndarray
    multimodal_embeds: np.ndarray
    multimodal_mask: np.ndarray
    params: SamplingParams
    stop_ids: frozenset[int]
    on_token: Callable[[int], None]  # each new token, as it is chosen
    on_finish: Callable[[], None]  # after the last token (max_tokens or a stop id)
    on_error: Callable[[BaseException], None]  # instead of on_finish
    position_ids: np.ndarray | None = None  # [3, S] M-RoPE positions, for a decoder that takes them
    is_cancelled: Callable[[], bool] = lambda: False  # asked before each step; True: dropped, no callback


@dataclass(frozen=True)
class KvBudget:
    """How much KV cache the admitted sequences may hold together, counted in positions: each reserves
    its prompt plus its ``max_tokens`` when admitted (its most), and gives them back when it ends."""

    tokens: int
    queue_timeout_s: float  # a request that waited this long for room is refused (ServerBusy)


@dataclass
class SchedulerStats:
    """Running totals since start, written by the scheduler's thread (read for the metrics endpoint)."""

    finished: int = 0
    failed: int = 0  # errors during decoding (refusals are counted where they are answered: triton_io)
    cancelled: int = 0  # dropped because their client went away (admitted or still waiting)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    first_token_seconds: float = 0.0  # submit to first token, summed over admitted requests
    first_tokens: int = 0
    prefill_seconds: float = 0.0  # time in prefills (which run between decode steps, one request at a time)
    decode_steps: int = 0
    decode_seconds: float = 0.0  # a step gives each of its sequences one token: the inter-token latency
    decode_sequences: int = 0  # summed over steps: / decode_steps is the mean batch


def reservation(job: DecodeJob) -> int:
    return int(job.input_ids.size) + job.params.max_tokens


class DecodeScheduler:
    def __init__(self, runner: SequenceRunner, max_batch: int, budget: KvBudget | None = None) -> None:
        self.runner = runner
        self.max_batch = max_batch
        self.budget = budget
        self.pending: queue.Queue[tuple[float, DecodeJob] | None] = queue.Queue()
        self.waiting: deque[tuple[float, DecodeJob]] = deque()  # submitted, in order, not yet admitted
        self.active: list[tuple[Sequence, DecodeJob]] = []
        self.reserved = 0  # positions the active sequences reserved
        self.stats = SchedulerStats()
        self.thread = threading.Thread(target=self._loop, name="decode-scheduler", daemon=True)
        self.thread.start()

    def submit(self, job: DecodeJob) -> None:
        if self.budget is not None and reservation(job) > self.budget.tokens:
            raise RequestError(f"max_tokens: prompt ({job.input_ids.size} tokens) + max_tokens ({job.params.max_tokens}) "
                               f"exceeds the KV budget of {self.budget.tokens} positions")
        self.pending.put((time.monotonic(), job))

    def close(self) -> None:
        self.pending.put(None)
        self.thread.join()

    def _loop(self) -> None:
        while True:
            # Block only when idle; otherwise take whatever arrived since the last step.
            block = not self.active and not self.waiting
            while block or not self.pending.empty():
                item = self.pending.get()
                if item is None:
                    return
                self.waiting.append(item)
                block = False
            self._drop_cancelled()
            self._admit_waiting()
            if not self.active:
                continue
            batch = self.active[: self.max_batch]
            started = time.monotonic()
            try:
                self.runner.decode([seq for seq, _ in batch])
            except Exception as exc:  # noqa: BLE001 - the failure goes to the requests it hit
                for pair in batch:
                    self.active.remove(pair)
                    self._end(pair[1], "failed")
                    pair[1].on_error(exc)
                continue
            self.stats.decode_steps += 1
            self.stats.decode_seconds += time.monotonic() - started
            self.stats.decode_sequences += len(batch)
            self.active = self.active[len(batch):]  # round-robin when more than max_batch are active
            for seq, job in batch:
                self._emit(seq, job)

    def _drop_cancelled(self) -> None:
        """Jobs whose client went away stop here, between steps: no more tokens, their reservation and slot freed."""
        for item in [item for item in self.waiting if item[1].is_cancelled()]:
            self.waiting.remove(item)
            self.stats.cancelled += 1
        for pair in [pair for pair in self.active if pair[1].is_cancelled()]:
            self.active.remove(pair)
            self._end(pair[1], "cancelled")

    def _admit_waiting(self) -> None:
        """Admits waiting requests in order while the budget has room; refuses those that waited too long."""
        if self.budget is not None:
            now, timeout = time.monotonic(), self.budget.queue_timeout_s
            for expired in [item for item in self.waiting if now - item[0] > timeout]:
                self.waiting.remove(expired)
                expired[1].on_error(ServerBusy(
                    f"no room in the KV budget ({self.budget.tokens} positions, {self.reserved} reserved) for this "
                    f"request's {reservation(expired[1])} within {timeout:g} s; retry later"))
        while self.waiting and (self.budget is None or self.reserved + reservation(self.waiting[0][1]) <= self.budget.tokens):
            since, job = self.waiting.popleft()
            self.reserved += reservation(job)
            self.stats.prompt_tokens += int(job.input_ids.size)
            started = time.monotonic()
            self._admit(job)
            ended = time.monotonic()
            self.stats.prefill_seconds += ended - started
            self.stats.first_token_seconds += ended - since  # the prefill chose the first token
            self.stats.first_tokens += 1

    def _admit(self, job: DecodeJob) -> None:
        try:
            seq = self.runner.start(job.input_ids, job.multimodal_embeds, job.multimodal_mask, job.params, job.stop_ids,
                                    job.position_ids)
        except Exception as exc:  # noqa: BLE001
            self._end(job, "failed")
            job.on_error(exc)
            return
        self._emit(seq, job)

    def _end(self, job: DecodeJob, outcome: Literal["finished", "failed", "cancelled"] = "finished") -> None:
        """Gives back an admitted job's reservation and counts how it ended (the stats field of that name)."""
        self.reserved -= reservation(job)
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)

    def _emit(self, seq: Sequence, job: DecodeJob) -> None:
        """Chooses the sequence's next token from its fresh logits; keeps it active unless finished."""
        try:
            token = seq.next_token()
            if token is not None:
                self.stats.generated_tokens += 1
                job.on_token(token)
            if seq.finished:
                job.on_finish()
        except Exception as exc:  # noqa: BLE001 - e.g. the client went away while sending
            self._end(job, "failed")
            job.on_error(exc)
            return
        if seq.finished:
            self._end(job)
            self.runner.retire(seq)  # after the answer went out: keeping its cache is a copy
        else:
            self.active.append((seq, job))
