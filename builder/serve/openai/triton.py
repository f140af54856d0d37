"""The front's calls to Triton (``tritonclient.grpc.aio``), and Triton's errors as OpenAI's.

Every answer, whole or streamed to the client, is one request on ``ensemble_stream`` (``stream`` set) over gRPC's
bidirectional stream; closing it early cancels the call, which ``ensemble_stream`` sees (``request.is_cancelled()``)
and stops the sequence on ``llm`` (README, "When a client goes away").
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from builder.runtime.contract import DECODE_MODEL, OUTPUT_IDS, STREAMING_ENSEMBLE
from builder.runtime.errors import BUSY_PREFIX
from builder.serve.client import Answer, Request, answer, is_final, request_inputs
from builder.serve.openai.chat_request import ApiError

T = TypeVar("T")
# The input a server's message names first: "messages[2].content[0]: ...", "image[1]: ...", "max_tokens: ...".
_NAMED_INPUT = re.compile(r"^(?P<name>[a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*): ")
# How a decoupled model's errors reach a streaming client: text only, no status (tritonclient's stream API).
_INTERNAL = ": internal error: "


class TritonChat:
    """One gRPC channel to Triton, shared by every request (grpc.aio multiplexes calls on it)."""

    def __init__(self, url: str, timeout_s: float, retry_after_s: int) -> None:
        self.url, self.timeout_s, self.retry_after_s = url, timeout_s, retry_after_s
        self.client = grpcaio.InferenceServerClient(url)
        self._default_max_tokens: int | None = None

    async def close(self) -> None:
        await self.client.close()

    async def ready(self) -> bool:
        try:
            return await self.client.is_model_ready(STREAMING_ENSEMBLE)
        except InferenceServerException:
            return False

    async def default_max_tokens(self) -> int:
        """The build's ``default_max_tokens`` (from ``llm``'s config): an answer that long ended at its limit."""
        if self._default_max_tokens is None:
            config = await self._call(self.client.get_model_config(DECODE_MODEL, as_json=True), {})
            self._default_max_tokens = int(config["config"]["parameters"]["default_max_tokens"]["string_value"])
        return self._default_max_tokens

    async def stream(self, request: Request, media_params: dict[str, str]) -> AsyncIterator[Answer]:
        """The answer's chunks as the server sends them. Closed before its end (the client went away, a stop
        string matched), it cancels the call: the server stops generating."""
        sent_all = asyncio.Event()

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": STREAMING_ENSEMBLE, "inputs": request_inputs(request, stream=True),
                   "parameters": {"triton_enable_empty_final_response": True}}
            await sent_all.wait()  # the stream stays open until the answer's last response

        responses = self.client.stream_infer(requests(), stream_timeout=self.timeout_s)
        finished = False
        try:
            async for result, error in responses:
                if error is not None:
                    raise self.api_error(error, media_params)
                if result.as_numpy(OUTPUT_IDS.name) is not None:
                    yield answer(result)
                if is_final(result):
                    finished = True
                    return
        except grpc.RpcError as exc:  # the channel itself: Triton down or the deadline passed
            raise self._rpc_error(exc) from None
        finally:
            sent_all.set()
            if not finished:
                responses.cancel()

    async def _call(self, call: Awaitable[T], media_params: dict[str, str]) -> T:
        try:
            return await call
        except InferenceServerException as exc:
            raise self.api_error(exc, media_params) from None

    def api_error(self, exc: InferenceServerException, media_params: dict[str, str]) -> ApiError:
        """INVALID_ARGUMENT -> 400 naming the parameter; UNAVAILABLE (the KV budget full, or Triton down) -> 503 with
        Retry-After; a deadline -> 504; anything else -> 500. A stream's errors carry no status: told by their text,
        as the server's own ``forwarded_error`` tells them."""
        status, message = exc.status(), exc.message() or str(exc)
        if status == "StatusCode.UNAVAILABLE" or message.startswith(BUSY_PREFIX):
            return ApiError(503, message, code="server_busy", kind="server_error",
                            headers={"Retry-After": str(self.retry_after_s)})
        if status == "StatusCode.DEADLINE_EXCEEDED":
            return ApiError(504, f"no answer within {self.timeout_s:g} s", code="timeout", kind="server_error")
        if status == "StatusCode.INVALID_ARGUMENT" or (status is None and _INTERNAL not in message):
            named = _NAMED_INPUT.match(message)
            param = named and named["name"]
            if param is not None and param in media_params:  # the client's part, not the contract's item
                message, param = f"{media_params[param]} ({param}){message[len(param):]}", media_params[param]
            return ApiError(400, message, param)
        return ApiError(500, message, kind="server_error")

    def _rpc_error(self, exc: grpc.RpcError) -> ApiError:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        message = f"Triton at {self.url}: {exc.details() if isinstance(exc, grpc.Call) else exc}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ApiError(504, f"no answer within {self.timeout_s:g} s", code="timeout", kind="server_error")
        if code == grpc.StatusCode.UNAVAILABLE:
            return ApiError(503, message, kind="server_error", headers={"Retry-After": str(self.retry_after_s)})
        return ApiError(500, message, kind="server_error")
