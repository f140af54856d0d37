"""A small gRPC client for the generated ensembles (the client contract of DESIGN.md).

``ask`` sends a unary request to ``ensemble``; ``ask_stream`` streams tokens from
``ensemble_stream``. Both take the same inputs: a prompt (or a whole conversation), 0..N image files and 0..N
WAV files. ``request_inputs`` and ``answer_text`` serve the asynchronous client too (builder.serve.openai):
tritonclient's ``grpc.aio`` takes the same ``InferInput`` objects and returns the same ``InferResult``.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from builder.runtime.contract import (
    AUDIO_INPUT, IMAGE_INPUT, MESSAGES_INPUT, OUTPUT_IDS, PROMPT_TOKENS_OUTPUT, SAMPLING_INPUTS, STREAM_INPUT,
    STREAMING_ENSEMBLE, SYSTEM_PROMPT_INPUT, TEXT_INPUT, TEXT_OUTPUT, UNARY_ENSEMBLE, Tensor,
)


@dataclass(frozen=True)
class Request:
    prompt: str | None  # the user's turn; None when ``messages`` carries the conversation
    images: tuple[bytes, ...] = ()
    audio: tuple[bytes, ...] = ()
    system_prompt: str | None = None  # replaces the chat template's default system prompt
    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    # The conversation instead of prompt + system_prompt: [{"role", "content"}], media parts {"type", "index"}
    messages: list[dict[str, Any]] | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # raw tensors, e.g. for testing bad input


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: list[int]
    prompt_tokens: int  # the prompt's length as the LLM read it (template, images and audio expanded)


def request_inputs(request: Request, stream: bool | None = None) -> list[grpcclient.InferInput]:
    """The request as the contract's input tensors; inputs left unset are not sent."""
    values: dict[Tensor, Any] = {
        TEXT_INPUT: request.prompt, IMAGE_INPUT: request.images or None, AUDIO_INPUT: request.audio or None,
        SYSTEM_PROMPT_INPUT: request.system_prompt, STREAM_INPUT: stream,
        MESSAGES_INPUT: json.dumps(request.messages, ensure_ascii=False) if request.messages is not None else None,
        **{t: getattr(request, t.name) for t in SAMPLING_INPUTS},  # Request has a field of each name
    }
    tensors = {t.name: _tensor(t, v) for t, v in values.items() if v is not None}
    tensors.update(request.extra)
    inputs = []
    for name, value in tensors.items():
        datatype = "BYTES" if value.dtype == np.object_ else grpcclient.np_to_triton_dtype(value.dtype)
        tensor = grpcclient.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def _tensor(spec: Tensor, value: Any) -> np.ndarray:
    items = list(value) if spec.dims == (-1,) else [value]
    if spec.data_type == "TYPE_STRING":
        items = [v.encode("utf-8") if isinstance(v, str) else v for v in items]
    return np.array(items, dtype=spec.numpy_dtype)


def ask(client: grpcclient.InferenceServerClient, request: Request, model: str = UNARY_ENSEMBLE, timeout: float = 300) -> Answer:
    return answer(client.infer(model, request_inputs(request), client_timeout=timeout))


def answer(result: grpcclient.InferResult) -> Answer:
    """A whole answer (or one streamed chunk of it) from the ensembles' outputs."""
    return Answer(answer_text(result.as_numpy(TEXT_OUTPUT.name)), result.as_numpy(OUTPUT_IDS.name).tolist(),
                  int(result.as_numpy(PROMPT_TOKENS_OUTPUT.name)[0]))


def ask_stream(
    client: grpcclient.InferenceServerClient, request: Request, model: str = STREAMING_ENSEMBLE, timeout: float = 300
) -> Iterator[tuple[str, list[int]]]:
    """Yields (text delta, token ids) as the server produces them; raises the server's error."""
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)), stream_timeout=timeout)
    try:
        client.async_stream_infer(model, request_inputs(request, stream=True), enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                raise error if isinstance(error, InferenceServerException) else InferenceServerException(str(error))
            if result.as_numpy(OUTPUT_IDS.name) is not None:
                chunk = answer(result)
                yield chunk.text, chunk.token_ids
            if is_final(result):
                return
    finally:
        client.stop_stream()


def is_final(result: grpcclient.InferResult) -> bool:
    """The stream's last response for its request (sent empty: ``enable_empty_final_response``)."""
    return result.get_response().parameters["triton_final_response"].bool_param


def answer_text(array: np.ndarray | None) -> str:
    if array is None or array.size == 0:
        return ""
    return b"".join(bytes(x) for x in array.reshape(-1)).decode("utf-8", errors="replace")
