"""The KV budget: sequences are admitted only while their KV fits; the rest wait in order or are refused."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from builder.runtime.errors import RequestError, ServerBusy
from builder.runtime.generation import LanguageModelRunner, SamplingParams
from builder.runtime.model_facts import ModelFacts
from builder.runtime.scheduler import DecodeJob, DecodeScheduler, KvBudget
from tests.conftest import CACHE, ROOT


class CountingRunner:
    """The real runner, recording how many positions the scheduler had reserved at every step; with
    ``step_delay_s`` each step also takes at least that long, so a wait outlasts a queue timeout on any machine."""

    def __init__(self, runner: LanguageModelRunner, step_delay_s: float = 0.0) -> None:
        self.runner, self.scheduler, self.reserved, self.step_delay_s = runner, None, [], step_delay_s

    def start(self, *args):
        return self.runner.start(*args)

    def retire(self, sequence):
        self.runner.retire(sequence)

    def decode(self, sequences):
        self.reserved.append(self.scheduler.reserved)
        time.sleep(self.step_delay_s)
        self.runner.decode(sequences)


@pytest.fixture(scope="module")
def runner(built_repository: Path) -> LanguageModelRunner:
    directory = built_repository / "llm" / "1"
    return LanguageModelRunner(str(directory / "model.onnx"), ModelFacts.load(directory / "model_facts.json"))


def run_jobs(runner: LanguageModelRunner, budget: KvBudget, count: int, prompt: int, max_tokens: int,
             step_delay_s: float = 0.0):
    counting = CountingRunner(runner, step_delay_s)
    scheduler = DecodeScheduler(counting, max_batch=8, budget=budget)
    counting.scheduler = scheduler
    done = threading.Semaphore(0)
    results: dict[int, object] = {}
    hidden = runner.facts.hidden_size
    for i in range(count):
        ids = np.random.default_rng(i).integers(16, 272, prompt)
        tokens: list[int] = []
        results[i] = tokens

        def finish(i: int = i) -> None:
            done.release()

        def fail(exc: BaseException, i: int = i) -> None:
            results[i] = exc
            done.release()

        scheduler.submit(DecodeJob(ids, np.zeros((prompt, hidden), np.float32), np.zeros(prompt, bool),
                                   SamplingParams(max_tokens), frozenset(), tokens.append, finish, fail))
    for _ in range(count):
        assert done.acquire(timeout=120)
    scheduler.close()
    return results, counting.reserved, scheduler.reserved


def test_requests_wait_in_order_and_the_budget_is_never_exceeded(runner: LanguageModelRunner) -> None:
    budget = KvBudget(tokens=100, queue_timeout_s=60)  # one request of 20 + 40 at a time, not two
    results, reserved, left = run_jobs(runner, budget, count=6, prompt=20, max_tokens=40)
    assert all(len(tokens) == 40 for tokens in results.values())  # every one answered in full
    assert max(reserved) <= budget.tokens and max(reserved) == 60 and left == 0


def test_a_request_that_waited_too_long_is_refused_as_busy(runner: LanguageModelRunner) -> None:
    budget = KvBudget(tokens=100, queue_timeout_s=0.05)
    # 60 steps of at least 5 ms: the first request holds the budget for 0.3 s, so the others wait past the timeout.
    results, reserved, left = run_jobs(runner, budget, count=6, prompt=20, max_tokens=60, step_delay_s=0.005)
    answered = [r for r in results.values() if isinstance(r, list)]
    refused = [r for r in results.values() if isinstance(r, ServerBusy)]
    assert answered and refused and len(answered) + len(refused) == 6
    assert str(refused[0]).startswith("server busy: no room in the KV budget (100 positions")
    assert max(reserved) <= budget.tokens and left == 0


def test_a_cancelled_sequence_stops_at_the_next_step_and_gives_back_its_reservation(runner: LanguageModelRunner) -> None:
    counting = CountingRunner(runner, step_delay_s=0.002)
    scheduler = DecodeScheduler(counting, max_batch=8, budget=KvBudget(tokens=200, queue_timeout_s=60))
    counting.scheduler = scheduler
    hidden = runner.facts.hidden_size
    gone = threading.Event()
    abandoned: list[int] = []
    kept: list[int] = []
    done = threading.Event()

    def job(on_token, on_finish, is_cancelled) -> DecodeJob:
        return DecodeJob(np.arange(16, 36), np.zeros((20, hidden), np.float32), np.zeros(20, bool), SamplingParams(80),
                         frozenset(), on_token, on_finish, lambda exc: pytest.fail(str(exc)), is_cancelled=is_cancelled)

    cancelled_at: list[int] = []

    def abandon_after_three(token: int) -> None:
        """The client goes away after its third token, once the other sequence decodes beside it (so both hold their
        reservation at once even when a loaded machine admits the second late)."""
        abandoned.append(token)
        if len(abandoned) >= 3 and kept and not gone.is_set():
            cancelled_at.append(len(abandoned))
            gone.set()

    scheduler.submit(job(abandon_after_three, lambda: pytest.fail("a cancelled job finished"), gone.is_set))
    scheduler.submit(job(kept.append, done.set, lambda: False))
    scheduler.submit(job(kept.append, done.set, lambda: True))  # gone before it was admitted
    assert done.wait(60)
    scheduler.close()
    assert len(abandoned) == cancelled_at[0] >= 3 and len(kept) == 80  # not one token after the cancel; the other in full
    assert max(counting.reserved) == 200 and counting.reserved[-1] == 100 and scheduler.reserved == 0
    assert (scheduler.stats.cancelled, scheduler.stats.finished, scheduler.stats.failed) == (2, 1, 0)
    assert not scheduler.active and not scheduler.waiting


def test_a_request_bigger_than_the_budget_is_refused_at_once(runner: LanguageModelRunner) -> None:
    scheduler = DecodeScheduler(runner, max_batch=8, budget=KvBudget(tokens=50, queue_timeout_s=1))
    job = DecodeJob(np.arange(16, 46), np.zeros((30, runner.facts.hidden_size), np.float32), np.zeros(30, bool),
                    SamplingParams(30), frozenset(), print, print, print)
    with pytest.raises(RequestError, match="exceeds the KV budget of 50 positions"):
        scheduler.submit(job)
    scheduler.close()


@pytest.mark.serving
def test_a_burst_against_a_small_budget_is_answered_or_refused_cleanly(tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from builder.build import build
    from builder.serve.client import Request, ask
    from builder.serve.tritonserver import TritonServer
    from builder.spec import load_spec

    spec = load_spec(ROOT / "specs" / "tiny.yaml", {"triton.kv_budget_tokens": 512, "triton.kv_queue_timeout_s": 0.01})
    build(spec, tmp_path / "repo", CACHE, progress=False)
    long = [Request(f"Tell me story number {i} about a fox and a river.", max_tokens=128) for i in range(16)]
    with (TritonServer(tmp_path / "repo", log_path=tmp_path / "tritonserver.log") as server,
          grpcclient.InferenceServerClient(server.grpc_url) as client):
        alone = {i: ask(client, request).token_ids for i, request in enumerate(long[:2])}

        def send(i: int) -> object:
            try:
                return ask(client, long[i]).token_ids
            except InferenceServerException as exc:
                return exc

        with ThreadPoolExecutor(16) as pool:
            burst = list(pool.map(send, range(16)))
        after = ask(client, long[0]).token_ids
    refused = [r for r in burst if isinstance(r, InferenceServerException)]
    assert all(r.status() == "StatusCode.UNAVAILABLE" and "server busy" in r.message() for r in refused), refused
    # The budget holds 3 of these at once; the others cannot get room within 10 ms (128 steps each).
    assert refused and len(refused) < 16
    assert all(burst[i] == alone[i] for i in alone if not isinstance(burst[i], InferenceServerException))
    assert after == alone[0]  # still serving, the same answer
