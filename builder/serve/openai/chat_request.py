"""An OpenAI chat-completions request body to the client contract's inputs, validated.

Every refusal is an :class:`ApiError` naming the parameter (``messages[1].content[0].image_url``); parameters
this server does not implement are refused by name, never ignored. The checks that need the model (the
chat template, image and audio contents, the limits) are the server's: its INVALID_ARGUMENT message reaches
the client with the parameter it names (see :mod:`.triton`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from builder.serve.client import Request


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {message}" if param else message, param)


# Parameters not implemented, refused when their value asks for what they do (the default values are fine:
# clients send them unasked).
NOT_IMPLEMENTED: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v not in (None, 1),
    "tools": bool,
    "tool_choice": lambda v: v not in (None, "none"),
    "functions": bool,
    "function_call": lambda v: v not in (None, "none"),
    "logprobs": bool,
    "top_logprobs": lambda v: v not in (None, 0),
    "response_format": lambda v: v not in (None, {"type": "text"}),
    "logit_bias": bool,
    "presence_penalty": lambda v: v not in (None, 0),
    "frequency_penalty": lambda v: v not in (None, 0),
    "modalities": lambda v: v not in (None, ["text"]),
    "audio": lambda v: v is not None,
    "prediction": lambda v: v is not None,
    "web_search_options": lambda v: v is not None,
    "reasoning_effort": lambda v: v is not None,
    "verbosity": lambda v: v is not None,
}
# Bookkeeping for OpenAI's platform, or meaningless without tools: no effect on an answer.
NO_EFFECT = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                       "prompt_cache_retention", "prompt_cache_options", "parallel_tool_calls"})
IMPLEMENTED = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                         "seed", "stop", "stream", "stream_options"})
MAX_STOP_STRINGS = 4  # as OpenAI's API
IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class ImageSource:
    """Where ``image_url`` parts may come from besides ``data:`` URLs (``file:`` never)."""

    allowed_hosts: frozenset[str] = frozenset()  # http(s) hosts the front may fetch from
    max_bytes: int = 20 << 20
    timeout_s: float = 10.0


@dataclass(frozen=True)
class ChatRequest:
    model: str
    request: Request  # the contract's inputs
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    max_tokens: int | None = None  # None: the build's default_max_tokens
    media_params: dict[str, str] = field(default_factory=dict)  # "image[0]" -> "messages[1].content[0]", for errors


async def read_chat_request(body: Any, images: ImageSource) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    for name, value in body.items():
        if name in NOT_IMPLEMENTED:
            if NOT_IMPLEMENTED[name](value):
                raise bad_request(f"not implemented by this server (value {json.dumps(value)[:200]})", name)
        elif name not in IMPLEMENTED | NO_EFFECT:
            raise bad_request(f"unrecognized request argument {name!r}", name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("required: the model's name (GET /v1/models lists it)", "model")
    stream = _optional(body, "stream", bool) or False
    stream_options = _optional(body, "stream_options", dict) or {}
    if stream_options and not stream:
        raise bad_request("only with stream: true", "stream_options")
    if set(stream_options) - {"include_usage"}:
        raise bad_request(f"only include_usage is implemented, got {sorted(stream_options)}", "stream_options")
    include_usage = _optional(stream_options, "include_usage", bool, "stream_options.include_usage") or False
    max_tokens = _max_tokens(body)
    messages, image_files, audio_files, media_params = await _conversation(body.get("messages"), images)
    request = Request(
        None, images=tuple(image_files), audio=tuple(audio_files), messages=messages, max_tokens=max_tokens,
        temperature=_optional(body, "temperature", float), top_p=_optional(body, "top_p", float),
        top_k=_optional(body, "top_k", int), seed=_seed(body),
    )
    return ChatRequest(model, request, stream, include_usage, _stop(body.get("stop")), max_tokens, media_params)


def _optional(body: dict[str, Any], name: str, kind: type, param: str | None = None) -> Any:
    """``body[name]`` of JSON type ``kind`` (an int is a float too; a bool is never a number), or None."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
        raise bad_request(f"expected {_JSON_NAMES[kind]}, got {value!r}", param or name)
    return float(value) if kind is float else value


_JSON_NAMES = {bool: "true or false", int: "an integer", float: "a number", dict: "an object", str: "a string"}


def _max_tokens(body: dict[str, Any]) -> int | None:
    """``max_completion_tokens`` (OpenAI's current name) or the older ``max_tokens``; both must then agree."""
    new, old = _optional(body, "max_completion_tokens", int), _optional(body, "max_tokens", int)
    if new is not None and old is not None and new != old:
        raise bad_request(f"{new} disagrees with max_tokens {old}: give one", "max_completion_tokens")
    return new if new is not None else old


def _seed(body: dict[str, Any]) -> int | None:
    seed = _optional(body, "seed", int)
    if seed is not None and not 0 <= seed < 1 << 64:
        raise bad_request(f"{seed} is outside 0..2^64-1", "seed")
    return seed


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"expected a non-empty string or a list of up to {MAX_STOP_STRINGS}, got {value!r}", "stop")
    return tuple(stops)


async def _conversation(messages: Any, images: ImageSource) -> tuple[list[dict[str, Any]], list[bytes], list[bytes], dict[str, str]]:
    """The contract's ``messages`` (turn for turn, so the server's ``messages[i]`` is the client's) and the files its
    media parts name, in order of appearance."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("expected a non-empty list of {\"role\", \"content\"} objects", "messages")
    turns: list[dict[str, Any]] = []
    files: dict[str, list[bytes]] = {"image": [], "audio": []}
    media_params: dict[str, str] = {}
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request("expected an object with role and content", where)
        role = ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise bad_request(f"role {message.get('role')!r} is not implemented (system, developer, user, assistant)",
                              f"{where}.role")
        unknown = set(message) - {"role", "content", "name"}  # a name changes nothing the templates render
        if unknown:
            raise bad_request(f"{', '.join(sorted(unknown))} not implemented (no tool calls, refusals or audio answers)", where)
        content = message.get("content")
        if isinstance(content, str):
            turns.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad_request("expected a string or a list of content parts", f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            param = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
                continue
            if role != "user" or kind not in ("image_url", "input_audio"):
                allowed = "text, image_url, input_audio" if role == "user" else "text"
                raise bad_request(f"part type {kind!r} is not implemented in a {message['role']} message ({allowed})", param)
            media = "image" if kind == "image_url" else "audio"
            data = await _image(part.get("image_url"), f"{param}.image_url", images) if media == "image" \
                else _audio(part.get("input_audio"), f"{param}.input_audio")
            media_params[f"{media}[{len(files[media])}]"] = param
            parts.append({"type": media, "index": len(files[media])})
            files[media].append(data)
        turns.append({"role": role, "content": parts})
    return turns, files["image"], files["audio"], media_params


async def _image(image_url: Any, param: str, source: ImageSource) -> bytes:
    url = image_url.get("url") if isinstance(image_url, dict) else None
    if not isinstance(url, str):
        raise bad_request("expected {\"url\": \"data:image/png;base64,...\"}", param)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        header, comma, data = url[5:].partition(",")
        mime, *options = header.split(";")
        if not comma or "base64" not in options:
            raise bad_request("a data: URL must be base64 (data:image/png;base64,...)", param)
        if mime.lower() not in IMAGE_TYPES:
            raise bad_request(f"{mime or 'no media type'} is not accepted: PNG or JPEG (image/png, image/jpeg)", param)
        return _base64(data, param)
    if scheme in ("http", "https"):
        host = urlsplit(url).hostname or ""
        if host not in source.allowed_hosts:
            raise bad_request(f"this server fetches no images from {host!r}; send a data: URL (base64 PNG or JPEG)"
                              + (" or start it with --allow-image-host" if not source.allowed_hosts else ""), param)
        return await asyncio.to_thread(_fetch, url, param, source)
    raise bad_request(f"{scheme or 'a relative'} URL is not accepted: send a data: URL (base64 PNG or JPEG)", param)


def _audio(input_audio: Any, param: str) -> bytes:
    if not isinstance(input_audio, dict) or not isinstance(input_audio.get("data"), str):
        raise bad_request("expected {\"data\": base64 WAV, \"format\": \"wav\"}", param)
    if input_audio.get("format") != "wav":
        raise bad_request(f"format {input_audio.get('format')!r} is not implemented: wav only", f"{param}.format")
    return _base64(input_audio["data"], f"{param}.data")


def _base64(data: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("not valid base64", param) from None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect could lead off the allow-list: refused."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _fetch(url: str, param: str, source: ImageSource) -> bytes:
    opener = urllib.request.build_opener(_NoRedirects)
    try:
        with opener.open(url, timeout=source.timeout_s) as response:
            data = response.read(source.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise bad_request(f"could not fetch the image ({exc})", param) from None
    if len(data) > source.max_bytes:
        raise ApiError(413, f"{param}: the image is over {source.max_bytes} bytes", param)
    return data
