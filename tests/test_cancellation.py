"""Streams whose client went away stop decoding: the server's own metrics show it, and it serves on."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import pytest

from builder.serve.client import Request, ask, ask_stream, request_inputs
from tests.conftest import CACHE, ROOT
from tests.test_metrics import scrape, settled

pytestmark = pytest.mark.serving

STREAMS = 8  # a full decode batch of the tiny build
MAX_TOKENS = 960  # the tiny decoder's 1024 positions less the prompt: seconds of decoding for 8 streams


def test_abandoned_streams_stop_and_give_back_their_kv(tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient

    from builder.build import build
    from builder.serve.tritonserver import TritonServer
    from builder.spec import load_spec

    spec = load_spec(ROOT / "specs" / "tiny.yaml", {"limits.max_context": 1024, "limits.max_tokens": MAX_TOKENS})
    build(spec, tmp_path / "repo", CACHE, progress=False)
    requests = [Request(f"Tell me story number {i} about a fox and a river.", max_tokens=MAX_TOKENS) for i in range(STREAMS)]
    with TritonServer(tmp_path / "repo", log_path=tmp_path / "tritonserver.log") as server:
        clients = [grpcclient.InferenceServerClient(server.grpc_url) for _ in range(STREAMS)]
        try:
            whole = ask(clients[0], requests[0])
            assert len(whole.token_ids) == MAX_TOKENS  # no stop token early: an abandoned stream had far to go
            before = settled(server, {"mmtb_requests_finished_total": 1})
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
            stopped = settled(server, {"mmtb_requests_cancelled_total": STREAMS, "mmtb_active_sequences": 0,
                                       "mmtb_kv_reserved_tokens": 0}, timeout=20)
            time.sleep(2.5)  # two more publications: nothing is decoding for them any more
            later = scrape(server)
            after = [ask(clients[0], request) for request in requests[:2]]
            streamed = [t for _, ids in ask_stream(clients[0], requests[1]) for t in ids]
        finally:
            for client in clients:
                client.close()
    assert stopped["mmtb_requests_cancelled_total"] == STREAMS, stopped
    assert stopped["mmtb_active_sequences"] == 0 and stopped["mmtb_kv_reserved_tokens"] == 0, stopped
    assert stopped["mmtb_requests_finished_total"] == before["mmtb_requests_finished_total"]  # none ran to its end
    spent = stopped["mmtb_generated_tokens_total"] - before["mmtb_generated_tokens_total"]
    assert STREAMS <= spent < STREAMS * MAX_TOKENS / 4, spent  # each stopped long before its answer's end
    assert later["mmtb_generated_tokens_total"] == stopped["mmtb_generated_tokens_total"]
    assert later["mmtb_requests_cancelled_total"] == STREAMS
    assert after[0] == whole and len(after[1].token_ids) == MAX_TOKENS  # still serving, whole answers
    assert streamed == after[1].token_ids
