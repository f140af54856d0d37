"""Answers whose client went away stop decoding: the server's own metrics show it, and it serves on.

Streams cancelled by their gRPC client, unary requests past their client's deadline, and OpenAI requests (whole
answers) whose HTTP connection closed, on a build whose answers run long enough to matter.
"""

from __future__ import annotations

import http.client
import json
import queue
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from builder.serve.client import Request, ask, ask_stream, request_inputs
from tests.conftest import CACHE, ROOT
from tests.openai_front import running_front
from tests.test_metrics import idle, scrape, settled

pytestmark = pytest.mark.serving

STREAMS = 8  # a full decode batch of the tiny build
MAX_TOKENS = 960  # the tiny decoder's 1024 positions less the prompt: seconds of decoding for 8 answers
PROMPTS = [f"Tell me story number {i} about a fox and a river." for i in range(STREAMS)]


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory):
    from builder.build import build
    from builder.serve.tritonserver import TritonServer
    from builder.spec import load_spec

    directory = tmp_path_factory.mktemp("cancellation")
    spec = load_spec(ROOT / "specs" / "tiny.yaml", {"limits.max_context": 1024, "limits.max_tokens": MAX_TOKENS})
    build(spec, directory / "repo", CACHE, progress=False)
    with TritonServer(directory / "repo", log_path=directory / "tritonserver.log") as server:
        yield server


def assert_stopped(server, before: dict[str, float], answers: int) -> None:
    """``answers`` more were cancelled, none ran to its end, each stopped long before it, and nothing decodes for them
    any more: the gauges are back to 0 and no token follows."""
    cancelled = before.get("mmtb_requests_cancelled_total", 0) + answers
    stopped = settled(server, {"mmtb_requests_cancelled_total": cancelled, "mmtb_active_sequences": 0,
                               "mmtb_kv_reserved_tokens": 0}, timeout=20)
    time.sleep(2.5)  # two more publications: nothing is decoding for them any more
    later = scrape(server)
    assert stopped["mmtb_requests_cancelled_total"] == cancelled, stopped
    assert stopped["mmtb_active_sequences"] == 0 and stopped["mmtb_kv_reserved_tokens"] == 0, stopped
    assert stopped["mmtb_requests_finished_total"] == before["mmtb_requests_finished_total"]  # none ran to its end
    spent = stopped["mmtb_generated_tokens_total"] - before["mmtb_generated_tokens_total"]
    # Each stopped long before its answer's end. The bound is loose on purpose: what decodes before the cancellation
    # reaches `llm` (a 0.2 s deadline, then Triton's gRPC frontend noticing it) scales with the machine's speed and load
    # (2,122 of 7,680 on a busy 2-core CI runner); the exact claims are the counters above and below.
    assert answers <= spent < answers * MAX_TOKENS / 2, spent
    assert later["mmtb_generated_tokens_total"] == stopped["mmtb_generated_tokens_total"]
    assert later["mmtb_requests_cancelled_total"] == cancelled


def test_abandoned_streams_stop_and_give_back_their_kv(slow_server) -> None:
    import tritonclient.grpc as grpcclient

    server = slow_server
    requests = [Request(prompt, max_tokens=MAX_TOKENS) for prompt in PROMPTS]
    clients = [grpcclient.InferenceServerClient(server.grpc_url) for _ in range(STREAMS)]
    try:
        whole = ask(clients[0], requests[0])
        assert len(whole.token_ids) == MAX_TOKENS  # no stop token early: an abandoned stream had far to go
        before = idle(server)
        responses: list[queue.Queue] = []
        for client, request in zip(clients, requests):
            responses.append(queue.Queue())
            client.start_stream(callback=lambda result, error, arrived=responses[-1]: arrived.put((result, error)))
            client.async_stream_infer("ensemble_stream", request_inputs(request, stream=True),
                                      enable_empty_final_response=True)
        for client, arrived in zip(clients, responses):
            _, error = arrived.get(timeout=60)  # the first token: the stream is decoding
            assert error is None, error
            client.stop_stream(cancel_requests=True)  # the client goes away
        assert_stopped(server, before, STREAMS)
        after = [ask(clients[0], request) for request in requests[:2]]
        streamed = [t for _, ids in ask_stream(clients[0], requests[1]) for t in ids]
    finally:
        for client in clients:
            client.close()
    assert after[0] == whole and len(after[1].token_ids) == MAX_TOKENS  # still serving, whole answers
    assert streamed == after[1].token_ids


def test_unary_requests_past_their_client_timeout_stop(slow_server) -> None:
    """`ensemble` is a Python model asking request.is_cancelled() between polls: a gRPC deadline reaches it."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    server = slow_server
    before = idle(server)

    def timed_out(prompt: str) -> str:
        with grpcclient.InferenceServerClient(server.grpc_url) as client, pytest.raises(InferenceServerException) as raised:
            client.infer("ensemble", request_inputs(Request(prompt, max_tokens=MAX_TOKENS)), client_timeout=0.2)
        return raised.value.status()

    with ThreadPoolExecutor(STREAMS) as pool:
        assert set(pool.map(timed_out, PROMPTS)) == {"StatusCode.DEADLINE_EXCEEDED"}
    assert_stopped(server, before, STREAMS)


def test_whole_openai_answers_whose_connection_closed_stop(slow_server) -> None:
    """A non-streamed chat completion streams from Triton inside the front: a client that hangs up cancels it."""
    server = slow_server
    with running_front(server.grpc_url) as url:
        before = idle(server)
        host = urlsplit(url)
        connections = []
        for prompt in PROMPTS:
            connection = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
            body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS}
            connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            connections.append(connection)
        time.sleep(0.2)  # the answers are decoding (a fraction of theirs: assert_stopped counts them cancelled)
        for connection in connections:
            connection.close()  # the client goes away, no answer read
        assert_stopped(server, before, STREAMS)
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as metrics:
            text = metrics.read().decode()
    assert f"mmtb_openai_streams_closed_by_client_total {STREAMS:.1f}" in text
    assert f'mmtb_openai_requests_total{{route="/v1/chat/completions",status="499"}} {STREAMS:.1f}' in text
