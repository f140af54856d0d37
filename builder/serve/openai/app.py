"""The HTTP side: routes, server-sent events, the API key, the body limit and the front's own metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from builder.errors import BuildError
from builder.serve.client import Answer
from builder.serve.openai.chat_request import ApiError, ChatRequest, ImageSource, bad_request, read_chat_request
from builder.serve.openai.triton import TritonChat

CHAT_ROUTE = "/v1/chat/completions"
CLIENT_CLOSED = 499  # nginx's status for a request whose client closed the connection first (in the request counts)
T = TypeVar("T")


@dataclass(frozen=True)
class FrontSettings:
    triton_url: str  # Triton's gRPC address, host:port
    model_name: str  # the one model /v1/models lists and requests must name
    api_key: str | None = None  # None: no authentication (keep the port private then)
    images: ImageSource = field(default_factory=ImageSource)
    max_body_bytes: int = 20 << 20
    timeout_s: float = 300.0  # a whole answer, or a whole stream
    retry_after_s: int = 1  # what a 503 (the KV budget full) tells a client to wait


def served_model_name(repository: Path) -> str:
    """The name a built repository was built under (its spec's ``name``, recorded in ``manifest.json``)."""
    try:
        return str(json.loads((repository / "manifest.json").read_text())["spec"]["name"])
    except (OSError, ValueError, KeyError) as exc:
        raise BuildError(f"{repository} holds no built repository's manifest.json ({exc}): give --model-name") from None


@dataclass
class Outcome:
    """What an answer came to, for ``usage`` and ``finish_reason``."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    stopped: bool = False  # a stop string ended it

    def finish_reason(self, max_tokens: int) -> str:
        # The server's answers leave out the stop token: max_tokens tokens mean the limit ended it.
        return "stop" if self.stopped or self.completion_tokens < max_tokens else "length"

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class StopText:
    """Cuts a streamed text at the first of ``stops``; holds back a tail that could be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.pending = stops, ""

    def push(self, delta: str) -> tuple[str, bool]:
        """The text that can go out now, and whether a stop string ended it."""
        self.pending += delta
        cuts = [at for at in (self.pending.find(stop) for stop in self.stops) if at >= 0]
        if cuts:
            text, self.pending = self.pending[:min(cuts)], ""
            return text, True
        hold = max((n for stop in self.stops for n in range(1, len(stop)) if self.pending.endswith(stop[:n])), default=0)
        text, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return text, False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


async def cut_at_stops(chunks: AsyncIterator[Answer], stops: tuple[str, ...], outcome: Outcome) -> AsyncIterator[str]:
    """The answer's text deltas up to its first stop string, counting into ``outcome``; ``chunks`` is closed when a
    stop string matched or this is closed (a client that went away): the server then stops generating."""
    cutter = StopText(stops)
    try:
        async for chunk in chunks:
            outcome.prompt_tokens = chunk.prompt_tokens
            outcome.completion_tokens += len(chunk.token_ids)
            text, outcome.stopped = cutter.push(chunk.text)
            if text:
                yield text
            if outcome.stopped:
                return
        if tail := cutter.flush():
            yield tail
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


class Completion:
    """One chat completion's envelope: its id, time and model, as every response and chunk carries them."""

    def __init__(self, model: str) -> None:
        self.id, self.created, self.model = f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), model

    def whole(self, text: str, outcome: Outcome, max_tokens: int) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                             "logprobs": None, "finish_reason": outcome.finish_reason(max_tokens)}],
                "usage": outcome.usage()}

    def chunk(self, delta: dict[str, str], finish_reason: str | None = None, usage: bool = False) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self.event({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                           "choices": [choice], **({"usage": None} if usage else {})})

    def usage_chunk(self, outcome: Outcome) -> str:
        return self.event({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                           "choices": [], "usage": outcome.usage()})

    @staticmethod
    def event(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class RequestCounter:
    """Pure ASGI (a BaseHTTPMiddleware would buffer streams and hide a client going away): counts each request by
    route and status into ``requests``."""

    def __init__(self, app: ASGIApp, requests: Counter) -> None:
        self.app, self.requests = app, requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # the route's pattern: bounded label values
            self.requests.labels(route=route, status=str(status)).inc()


async def read_json(request: HttpRequest, limit: int) -> Any:
    """The body as JSON, refused with 413 past ``limit`` bytes (before reading it when its length says so)."""
    too_large = ApiError(413, f"the request body is over this server's limit of {limit} bytes (--max-body-mb)",
                         code="request_too_large")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON ({exc})") from None


def create_app(settings: FrontSettings) -> FastAPI:
    registry = CollectorRegistry()  # per app: several fronts (tests) in one process
    requests = Counter("mmtb_openai_requests", "HTTP requests by route and status", ["route", "status"], registry=registry)
    closed = Counter("mmtb_openai_streams_closed_by_client", "Answers (streamed or whole) whose client went away "
                     "before their end (the Triton stream was cancelled)", registry=registry)
    triton: TritonChat

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        nonlocal triton
        triton = TritonChat(settings.triton_url, settings.timeout_s, settings.retry_after_s)  # on the server's event loop
        yield
        await triton.close()

    app = FastAPI(title="mmtb OpenAI-compatible front", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(RequestCounter, requests=requests)

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: HttpRequest, exc: HTTPException) -> JSONResponse:  # unknown routes, wrong methods
        return await api_error(_, ApiError(exc.status_code, str(exc.detail), code=None))

    async def authorized(request: HttpRequest) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key")

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = await triton.ready()
        return JSONResponse({"status": "ready" if ready else "not ready", "triton": settings.triton_url},
                            status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])
    model_card = {"id": settings.model_name, "object": "model", "created": int(time.time()), "owned_by": "mmtb"}

    def known_model(name: str) -> None:
        if name != settings.model_name:
            raise ApiError(404, f"the model {name!r} does not exist: this server serves {settings.model_name!r}",
                           param="model", code="model_not_found")

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card]}

    @v1.get("/models/{name}")
    async def model(name: str) -> dict[str, Any]:
        known_model(name)
        return model_card

    @v1.post("/chat/completions")
    async def chat_completions(request: HttpRequest) -> Response:
        chat = await read_chat_request(await read_json(request, settings.max_body_bytes), settings.images)
        known_model(chat.model)
        max_tokens = chat.max_tokens or await triton.default_max_tokens()
        completion, outcome = Completion(chat.model), Outcome()
        # A whole answer too is streamed from Triton and joined here: a client that hangs up cancels the stream.
        deltas = cut_at_stops(triton.stream(chat.request, chat.media_params), chat.stop, outcome)
        if not chat.stream:
            text = await unless_disconnected(request, joined(deltas))
            if text is None:
                closed.inc()
                return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the request counter does
            return JSONResponse(completion.whole(text, outcome, max_tokens))
        # The first piece before the response starts: a refusal (400, 503) still gets its status.
        first = await anext(deltas, None)
        return StreamingResponse(events(chat, completion, outcome, max_tokens, first, deltas, closed),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    app.include_router(v1)
    return app


async def joined(deltas: AsyncIterator[str]) -> str:
    return "".join([d async for d in deltas])


async def unless_disconnected(request: HttpRequest, answer: Awaitable[T]) -> T | None:
    """``answer``'s result, or None when the HTTP client hung up first: ``answer`` is then cancelled (with it, its
    Triton stream: the server stops generating)."""
    work, gone = asyncio.ensure_future(answer), asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    return None if work.cancelled() else work.result()


async def disconnected(request: HttpRequest) -> None:
    """Returns when the client closes the connection. Its body has been read: the server's next message is the
    disconnect (uvicorn waits for it)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def events(chat: ChatRequest, completion: Completion, outcome: Outcome, max_tokens: int, first: str | None,
                 deltas: AsyncIterator[str], closed: Counter) -> AsyncIterator[str]:
    """The stream as server-sent events: the role, the text deltas, the finish reason, the usage if asked, [DONE]."""
    ended = False
    try:
        yield completion.chunk({"role": "assistant", "content": ""}, usage=chat.include_usage)
        text: str | None = first
        while text is not None:
            yield completion.chunk({"content": text}, usage=chat.include_usage)
            text = await anext(deltas, None)
        yield completion.chunk({}, outcome.finish_reason(max_tokens), usage=chat.include_usage)
        if chat.include_usage:
            yield completion.usage_chunk(outcome)
        ended = True
        yield "data: [DONE]\n\n"
    except ApiError as exc:  # after the response started: the error as an event, as OpenAI sends one
        ended = True
        yield Completion.event(exc.body())
    finally:
        if not ended:
            closed.inc()
        await deltas.aclose()  # type: ignore[attr-defined]
