"""Encoders batched across requests on the python target, requests without media included.

Each request's media travel as ``[1, items, ...]`` with ``allow_ragged_batch``: the 1 is Triton's
batch axis, so a request without images is a batch of 1 holding none (Triton refuses a batch of 0).
A long queue delay from the spec makes Triton gather concurrent requests into one execution.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import CACHE, ROOT, png_bytes, wav_bytes

pytestmark = pytest.mark.serving


def executions(client, model: str) -> tuple[int, int]:
    """(requests answered, executions of the model)."""
    (stats,) = client.get_inference_statistics(model).model_stats
    return stats.inference_count, stats.execution_count


def test_concurrent_requests_share_encoder_runs_and_get_their_own_answers(tmp_path: Path, client) -> None:
    import tritonclient.grpc as grpcclient

    from builder.build import build
    from builder.serve.client import Request, ask
    from builder.serve.tritonserver import TritonServer
    from builder.spec import load_spec

    spec = load_spec(ROOT / "specs" / "tiny.yaml", {"triton.max_queue_delay_us": 400_000, "triton.max_batch_size": 8})
    build(spec, tmp_path / "repo", CACHE, progress=False)
    config = (tmp_path / "repo" / "vision_encoder" / "config.pbtxt").read_text()
    assert "max_batch_size: 8" in config and "max_queue_delay_microseconds: 400000" in config
    requests = [
        Request("Describe this picture.", images=(png_bytes(1),), max_tokens=6),
        Request("What is the capital of France?", max_tokens=6),  # no media: 0 images, 0 clips
        Request("Compare them.", images=(png_bytes(2), png_bytes(3, (40, 120))), audio=(wav_bytes(1.0, 440),), max_tokens=6),
        Request("Transcribe the recording.", audio=(wav_bytes(1.5, 660),), max_tokens=6),
        Request("Another picture.", images=(png_bytes(4, (40, 120)),), max_tokens=6),
        Request("Hello there.", max_tokens=6),
    ]
    alone = [ask(client, r).token_ids for r in requests]  # the default build (2 ms delay), one at a time
    with (TritonServer(tmp_path / "repo", log_path=tmp_path / "tritonserver.log") as server,
          grpcclient.InferenceServerClient(server.grpc_url) as batched_client):
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda r: ask(batched_client, r).token_ids, requests))
        counts = {model: executions(batched_client, model) for model in ("vision_encoder", "audio_encoder")}
    assert together == alone
    for model, (answered, executed) in counts.items():
        assert answered == len(requests), model  # every request passes every encoder, media or not
        assert executed < answered, f"{model}: {executed} executions for {answered} requests: nothing was batched"
