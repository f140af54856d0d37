"""The OpenAI-compatible front (builder.serve.openai) in a thread of the test process, on a free 127.0.0.1 port,
in front of a running tritonserver; and the request parts an OpenAI client sends."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai
import pytest
import uvicorn

from builder.serve.openai import FrontSettings, create_app


@contextmanager
def running_front(triton_url: str, model_name: str = "tiny", **settings: Any) -> Iterator[str]:
    """Yields the front's base URL (``http://127.0.0.1:PORT``); ``settings``: FrontSettings' other fields."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(FrontSettings(triton_url, model_name, **settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"openai-front-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail(f"the OpenAI front did not start on port {port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def openai_client(base_url: str, api_key: str = "unused", **options: Any) -> openai.OpenAI:
    # No retries: a test sees each answer as the server gave it (503s included).
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=300, **options)


def image_part(png: bytes) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}


def audio_part(wav: bytes) -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}


def openai_messages(conversation: list[dict[str, Any]], images: list[bytes] = (), audio: list[bytes] = ()) -> list[dict[str, Any]]:
    """A conversation in the contract's ``messages`` shape (media parts ``{"type", "index"}``) as an OpenAI client
    writes it: each media part holding its file (``image_url`` data URL, ``input_audio``)."""
    def part(item: dict[str, Any]) -> dict[str, Any]:
        if item["type"] == "text":
            return item
        return image_part(images[item["index"]]) if item["type"] == "image" else audio_part(audio[item["index"]])

    return [{**m, "content": m["content"] if isinstance(m["content"], str) else [part(p) for p in m["content"]]}
            for m in conversation]


def streamed(client: openai.OpenAI, **request: Any) -> tuple[str, list[Any]]:
    """A streamed completion's concatenated content, and its chunks."""
    chunks = list(client.chat.completions.create(stream=True, **request))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks
