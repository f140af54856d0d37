"""The OpenAI-compatible front against a real tritonserver, through the official ``openai`` client.

On the default tiny build: the front's answers are the contract's (the same text, prompt_tokens and token count as
``ask`` on the ensembles), streaming equals unary, ``[DONE]`` and ``include_usage``, ``stop`` and ``max_tokens``
finish reasons, and every row of the error table. On a build with a KV budget of one long answer: a second
request gets 503 + Retry-After while the first decodes, and a stream closed after its first chunk is cancelled
on the server (``mmtb_requests_cancelled_total``) and frees the budget. The families' exact-text checks against
Hugging Face live with their checkpoints (tests/test_real_checkpoint.py, tests/test_qwen2_audio_checkpoint.py).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import openai
import pytest

from builder.serve.client import Request, ask
from tests.conftest import CACHE, ROOT, png_bytes, wav_bytes
from tests.openai_front import audio_part, image_part, openai_client, running_front, streamed
from tests.test_metrics import scrape, settled

pytestmark = pytest.mark.serving

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "text", "text": "What is in the picture?"}, {"type": "image", "index": 0}]},
    {"role": "assistant", "content": "A fox."},
    {"role": "user", "content": [{"type": "audio", "index": 0}, {"type": "text", "text": "And what do you hear?"}]},
]
PICTURE, CLIP = png_bytes(3), wav_bytes(1.0, 330.0)
MESSAGES = [CONVERSATION[0], {"role": "user", "content": [CONVERSATION[1]["content"][0], image_part(PICTURE)]},
            CONVERSATION[2], {"role": "user", "content": [audio_part(CLIP), CONVERSATION[3]["content"][1]]}]


@pytest.fixture(scope="module")
def front(server) -> str:
    with running_front(server.grpc_url) as url:
        yield url


@pytest.fixture(scope="module")
def chat(front: str):
    return openai_client(front)


def test_models_and_health(front: str, chat) -> None:
    assert [m.id for m in chat.models.list()] == ["tiny"]
    with urllib.request.urlopen(f"{front}/health", timeout=30) as response:
        assert response.status == 200 and json.load(response)["status"] == "ready"


def test_a_conversation_with_an_image_and_audio_is_the_contracts_answer(chat, client) -> None:
    """The front's messages/image/audio are the ones a contract client sends: the same text and counts."""
    direct = ask(client, Request(None, images=(PICTURE,), audio=(CLIP,), messages=CONVERSATION, max_tokens=16))
    reply = chat.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16)
    assert reply.choices[0].message.content == direct.text and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == direct.prompt_tokens > 40  # the image's and the clip's tokens counted
    assert reply.usage.completion_tokens == len(direct.token_ids) == 16 and reply.choices[0].finish_reason == "length"
    assert reply.model == "tiny" and reply.id.startswith("chatcmpl-") and reply.created > 0


def test_streaming_equals_unary_with_usage_and_done(front: str, chat) -> None:
    request = {"model": "tiny", "messages": MESSAGES, "max_completion_tokens": 24}
    unary = chat.chat.completions.create(**request)
    text, chunks = streamed(chat, stream_options={"include_usage": True}, **request)
    assert text == unary.choices[0].message.content and len(chunks) >= 3
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert not chunks[-1].choices and chunks[-1].usage.model_dump() == unary.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    raw = urllib.request.Request(f"{front}/v1/chat/completions", json.dumps({**request, "stream": True}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(raw, timeout=120) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])  # only when asked for


def test_stop_cuts_the_text_and_finishes_with_stop(chat) -> None:
    request = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 24}
    whole = chat.chat.completions.create(**request).choices[0].message.content
    stop = whole[8:10]
    cut = chat.chat.completions.create(stop=[stop, "never in the text \u2603"], **request)
    assert cut.choices[0].message.content == whole[:whole.index(stop)] and cut.choices[0].finish_reason == "stop"
    text, chunks = streamed(chat, stop=stop, **request)
    assert text == whole[:whole.index(stop)] and chunks[-1].choices[0].finish_reason == "stop"
    assert chat.chat.completions.create(**{**request, "max_tokens": 5}).choices[0].finish_reason == "length"


@pytest.mark.parametrize(("extra", "param", "message"), [
    ({"max_tokens": 0}, "max_tokens", r"max_tokens: 0 is outside 1\.\.128"),
    ({"temperature": -1}, "temperature", r"temperature"),
    ({"n": 2}, "n", r"n: not implemented"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools", r"tools: not implemented"),
    ({"logprobs": True}, "logprobs", r"logprobs: not implemented"),
    ({"response_format": {"type": "json_object"}}, "response_format", r"response_format: not implemented"),
])
def test_a_bad_request_is_400_naming_the_parameter(chat, extra: dict, param: str, message: str) -> None:
    with pytest.raises(openai.BadRequestError, match=message) as raised:
        chat.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], **extra)
    assert raised.value.status_code == 400 and raised.value.param == param


def test_bad_media_is_400_naming_the_part(chat) -> None:
    bad_image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}  # "hello": no PNG
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.content\[1\] \(image\[0\]\): not a PNG or JPEG") as raised:
        chat.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is it?"}, bad_image]}])
    assert raised.value.param == "messages[0].content[1]"
    for url, says in (("file:///etc/passwd", r"file URL is not accepted"), ("http://example.com/a.png", r"fetches no images")):
        with pytest.raises(openai.BadRequestError, match=says):
            chat.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}]}])
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.content\[0\]\.input_audio\.format: .*wav only"):
        chat.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}}]}])


def test_an_unknown_model_is_404(chat) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist") as raised:
        chat.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert raised.value.code == "model_not_found"


def test_an_oversized_body_is_413(server) -> None:
    with running_front(server.grpc_url, max_body_bytes=64 << 10) as url:
        with pytest.raises(openai.APIStatusError) as raised:
            openai_client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
                {"type": "text", "text": "What is it?"}, image_part(png_bytes(1, size=(256, 256)))]}])
        assert raised.value.status_code == 413 and "limit of 65536 bytes" in raised.value.message


def test_an_api_key_is_required_when_set(server) -> None:
    with running_front(server.grpc_url, api_key="sesame") as url:
        for key in ("wrong", "unused"):
            with pytest.raises(openai.AuthenticationError) as raised:
                openai_client(url, api_key=key).models.list()
            assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
        reply = openai_client(url, api_key="sesame").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        assert reply.usage.completion_tokens == 3
        with urllib.request.urlopen(f"{url}/health", timeout=30) as response:  # probes need no key
            assert response.status == 200


def test_the_front_counts_requests_by_route_and_status(front: str, chat) -> None:
    with pytest.raises(openai.NotFoundError):
        chat.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    with urllib.request.urlopen(f"{front}/metrics", timeout=30) as response:
        text = response.read().decode()
    assert 'mmtb_openai_requests_total{route="/v1/chat/completions",status="404"}' in text
    assert 'mmtb_openai_requests_total{route="/v1/models",status="200"}' in text


@pytest.fixture(scope="module")
def small_budget(tmp_path_factory: pytest.TempPathFactory):
    """A server whose KV budget holds one long answer: a second request waits 10 ms, then is refused as busy."""
    from builder.build import build
    from builder.serve.tritonserver import TritonServer
    from builder.spec import load_spec

    directory = tmp_path_factory.mktemp("small-budget")
    spec = load_spec(ROOT / "specs" / "tiny.yaml", {"limits.max_context": 1024, "limits.max_tokens": 960,
                                                    "triton.kv_budget_tokens": 1024, "triton.kv_queue_timeout_s": 0.01})
    build(spec, directory / "repo", CACHE, progress=False)
    with (TritonServer(directory / "repo", log_path=directory / "tritonserver.log") as server,
          running_front(server.grpc_url) as url):
        yield server, openai_client(url)


def test_a_full_kv_budget_is_503_with_retry_after_and_a_closed_stream_frees_it(small_budget) -> None:
    server, chat = small_budget
    long = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me story number 0 about a fox and a river."}], "max_tokens": 960}
    before = scrape(server)
    stream = chat.chat.completions.create(stream=True, **long)
    chunks = iter(stream)
    next(chunks)  # the role: the answer has started (its first token is on the way)
    next(chunks)  # its first text: it holds the budget now
    with pytest.raises(openai.APIStatusError) as raised:
        chat.chat.completions.create(**long)
    assert raised.value.status_code == 503 and raised.value.response.headers["Retry-After"] == "1"
    assert "server busy" in raised.value.message
    stream.close()  # the client goes away
    cancelled = before.get("mmtb_requests_cancelled_total", 0) + 1
    after = settled(server, {"mmtb_requests_cancelled_total": cancelled, "mmtb_kv_reserved_tokens": 0}, timeout=20)
    assert after["mmtb_requests_cancelled_total"] == cancelled and after["mmtb_kv_reserved_tokens"] == 0, after
    assert after["mmtb_generated_tokens_total"] - before.get("mmtb_generated_tokens_total", 0) < 480  # stopped early
    reply = chat.chat.completions.create(**{**long, "max_tokens": 8})  # room again
    assert reply.usage.completion_tokens == 8


def test_the_served_name_is_the_builds(built_repository: Path) -> None:
    from builder.serve.openai import served_model_name

    assert served_model_name(built_repository) == "tiny"
