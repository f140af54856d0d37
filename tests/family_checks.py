"""What every family's served test does the same way: a spec pointed at its checkpoint, a real tritonserver over
the built repository, the checks of a served answer, and the INT8 build's promise (each component gated, the
pipeline gated, fallbacks said)."""

from __future__ import annotations

import io
import json
import wave
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from builder.build import build
from builder.serve.client import Request, ask, ask_stream
from builder.spec import BuildSpec, load_spec
from tests.conftest import CACHE, ROOT


def family_spec(template: str | None, checkpoint: Path, **limits: int) -> BuildSpec:
    """``specs/<template>`` pointed at ``checkpoint``, with its limits overridden by ``limits``; ``template`` None: no
    spec file, as ``make engines CHECKPOINT=dir`` builds (every key's default, the limits following the checkpoint)."""
    return load_spec(ROOT / "specs" / template if template else None, {
        "source.preset": None, "source.checkpoint": str(checkpoint), "name": f"{checkpoint.parent.name}-test",
        **{f"limits.{key}": value for key, value in limits.items()},
    })


def family_fixtures(write_checkpoint: Callable[[Path], Path], template: str | None = "tiny.yaml",
                    **limits: int) -> tuple[Any, Any, Any]:
    """Module fixtures ``checkpoint`` (written by ``write_checkpoint``), ``repository`` (built from
    ``specs/<template>`` with ``limits``, see :func:`family_spec`) and ``connection`` (a gRPC client of a
    tritonserver serving it)."""

    @pytest.fixture(scope="module", name="checkpoint")
    def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
        return write_checkpoint(tmp_path_factory.mktemp("family") / "checkpoint")

    @pytest.fixture(scope="module", name="repository")
    def repository(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
        output = tmp_path_factory.mktemp("repository") / "model_repository"
        build(family_spec(template, checkpoint, **limits), output, CACHE, progress=False)
        return output

    @pytest.fixture(scope="module", name="connection")
    def connection(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpcclient.InferenceServerClient]:
        with serving(repository, tmp_path_factory.mktemp("triton")) as client:
            yield client

    return checkpoint, repository, connection


def assert_served_as_reference(connection: grpcclient.InferenceServerClient, request: Request, expected: list[int]) -> None:
    """The server's greedy ``output_ids`` for ``request`` are HF's ``expected`` (which must not be degenerate)."""
    assert len(set(expected)) >= 8, f"degenerate reference output {expected}"
    assert ask(connection, request).token_ids == expected


def assert_streaming_equals_unary(connection: grpcclient.InferenceServerClient, request: Request) -> None:
    """The same tokens, and text deltas that concatenate to the unary text exactly (a character spanning tokens is
    held back until it is whole: no U+FFFD that the unary answer does not have)."""
    unary = ask(connection, request)
    chunks = list(ask_stream(connection, request))
    assert [t for _, ids in chunks for t in ids] == unary.token_ids
    assert "".join(delta for delta, _ in chunks) == unary.text


def assert_refused(connection: grpcclient.InferenceServerClient, request: Request, message: str) -> None:
    """``INVALID_ARGUMENT`` naming the problem (``message``, a regex), and the server keeps serving."""
    with pytest.raises(InferenceServerException, match=message) as raised:
        ask(connection, request)
    assert str(raised.value.status()) == "StatusCode.INVALID_ARGUMENT"
    assert ask(connection, Request("Still there?", max_tokens=4)).token_ids


class Connection(grpcclient.InferenceServerClient):
    """A gRPC client of a served repository that knows its server: an OpenAI front started beside it
    (tests/openai_front.py) calls the same server, and a test reads the server's metrics."""

    def __init__(self, server: Any) -> None:
        super().__init__(server.grpc_url)
        self.url, self.server = server.grpc_url, server


@contextmanager
def serving(repository: Path, log_directory: Path) -> Iterator[Connection]:
    """A real tritonserver on ``repository`` and a gRPC client to it."""
    from builder.serve.tritonserver import TritonServer

    with TritonServer(repository, log_path=log_directory / "tritonserver.log") as server:
        with Connection(server) as client:
            yield client


@contextmanager
def openai_chat(connection: Connection, repository: Path) -> Iterator[tuple[Any, str]]:
    """An ``openai.OpenAI`` client of the OpenAI front, started in front of ``connection``'s server, and the model
    name it serves (the repository's)."""
    from builder.serve.openai import served_model_name
    from tests.openai_front import openai_client, running_front

    name = served_model_name(repository)
    with running_front(connection.url, name) as url:
        yield openai_client(url), name


def assert_openai_chat_as_reference(connection: Connection, repository: Path, messages: list[dict[str, Any]],
                                    expected: list[int], text: str, prompt_length: int) -> None:
    """Through the OpenAI front with the ``openai`` client, ``messages`` (OpenAI's shape) get HF's reply ``text``
    (its greedy tokens ``expected``, which must not be degenerate, decoded without special tokens) and HF's
    ``prompt_length`` as ``usage.prompt_tokens``, unary and streamed."""
    from tests.openai_front import streamed

    assert len(set(expected)) >= 8 and len(text) > 8, f"degenerate reference output {expected}"
    request = {"messages": messages, "max_tokens": len(expected)}
    with openai_chat(connection, repository) as (chat, name):
        reply = chat.chat.completions.create(model=name, **request)
        assert reply.choices[0].message.content == text
        assert reply.usage.prompt_tokens == prompt_length and reply.usage.completion_tokens == len(expected)
        assert streamed(chat, model=name, **request)[0] == text


# A conversation as a chat client sends it (the contract's `messages`, OpenAI's shape): a system turn, images in two
# user turns, an earlier answer.
IMAGE_CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "image", "index": 0}, {"type": "text", "text": "What is in the picture?"}]},
    {"role": "assistant", "content": "The quick brown fox near the river."},
    {"role": "user", "content": [{"type": "text", "text": "Compare it with this one."}, {"type": "image", "index": 1}]},
]


def assert_image_conversation_as_reference(connection: Connection, repository: Path, hf_pipeline: tuple[Any, Any],
                                           conversation: list[dict[str, Any]], pictures: list, max_new_tokens: int) -> None:
    """``conversation`` (the contract's ``messages`` shape, image parts naming ``pictures`` by index) through the OpenAI
    front equals HF's own pipeline on it: the processor's ``apply_chat_template`` with the images + ``generate``."""
    from tests.hf_checkpoints import hf_conversation, hf_conversation_generate, hf_conversation_inputs, png
    from tests.openai_front import openai_messages

    model, processor = hf_pipeline
    hf = hf_conversation(conversation, image=pictures)
    expected = hf_conversation_generate(model, processor, hf, max_new_tokens)
    prompt_length = hf_conversation_inputs(processor, hf)["input_ids"].shape[1]
    assert_openai_chat_as_reference(connection, repository, openai_messages(conversation, images=[png(p) for p in pictures]),
                                    expected, processor.tokenizer.decode(expected, skip_special_tokens=True), prompt_length)


def assert_next_turn_reuses_the_earlier_one(connection: Connection, hf_pipeline: tuple[Any, Any], first_turn: list[dict[str, Any]],
                                            pictures: list, next_turn: str, max_new_tokens: int) -> tuple[int, int, int]:
    """A chat client's second turn: ``first_turn`` (the contract's ``messages``, image parts naming ``pictures``), the
    served answer as the assistant's turn, then the user's ``next_turn``. Both answers equal HF's pipeline on the same
    conversation, and the second prefill reused more than the first turn's prompt from the prefix cache (the server's
    own ``mmtb_prefix_cache_reused_tokens_total``): the image and the answer too. Returns the positions reused and
    both prompts' lengths."""
    from tests.hf_checkpoints import hf_conversation, hf_conversation_generate, png
    from tests.test_metrics import idle, settled

    model, processor = hf_pipeline
    images = tuple(png(p) for p in pictures)
    first = ask(connection, Request(None, images=images, messages=first_turn, max_tokens=max_new_tokens))
    assert first.token_ids == hf_conversation_generate(model, processor, hf_conversation(first_turn, image=pictures), max_new_tokens)
    conversation = [*first_turn, {"role": "assistant", "content": first.text}, {"role": "user", "content": next_turn}]
    before = idle(connection.server)
    second = ask(connection, Request(None, images=images, messages=conversation, max_tokens=max_new_tokens))
    after = settled(connection.server, {"mmtb_first_tokens_total": before["mmtb_first_tokens_total"] + 1})
    expected = hf_conversation_generate(model, processor, hf_conversation(conversation, image=pictures), max_new_tokens)
    assert len(set(expected)) >= 8 and second.token_ids == expected
    reused = int(after["mmtb_prefix_cache_reused_tokens_total"] - before["mmtb_prefix_cache_reused_tokens_total"])
    assert first.prompt_tokens < reused < second.prompt_tokens, (reused, first.prompt_tokens, second.prompt_tokens)
    return reused, first.prompt_tokens, second.prompt_tokens


def noisy_wav(seed: int, seconds: float, rate: int = 16000) -> bytes:
    """A tone under noise, 16-bit mono: features an audio tower can tell apart."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) + 0.05 * rng.standard_normal(t.size)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def assert_int8_build_kept_its_promise(checkpoint: Path, directory: Path, printed: Callable[[], str], kinds: list[str],
                                       **limits: int) -> None:
    """Builds ``specs/tiny-int8.yaml`` for ``checkpoint`` into ``directory`` and checks what an INT8 build promises on
    any CPU: each published component passed its own gate, the pipeline passed the pipeline gate for every kind of
    request the model takes (``kinds``), and a component kept in float says why (in what the build ``printed``)."""
    spec = family_spec("tiny-int8.yaml", checkpoint, **limits)
    build(spec, directory, CACHE, progress=False)
    manifest = json.loads((directory / "manifest.json").read_text())
    pipeline = manifest["pipeline_gate"]
    assert pipeline["passed"] and [k["kind"] for k in pipeline["figures"]["kinds"]] == kinds
    assert all(k["agreement"]["agreement"] >= spec.quantize.pipeline_gate.min_agreement for k in pipeline["figures"]["kinds"])
    output = printed()
    for name, component in manifest["components"].items():
        last = component["quantization"]["attempts"][-1]
        assert not last["gate"] or not last["gate"]["failures"], name
        if component["precision"] != "int8":
            assert "fell back after" in output or f"pipeline gate: {name}" in output, name
