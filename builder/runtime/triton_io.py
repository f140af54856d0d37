"""Helpers for the Python-backend ``model.py`` files: reading inputs, parameters, answering errors.

Imported only inside Triton (``triton_python_backend_utils`` exists there and nowhere else).
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from .contract import OUTPUT_IDS, SAMPLING_INPUTS, TEXT_OUTPUT
from .errors import BUSY_PREFIX, RequestError, ServerBusy
from .generation import SamplingParams
from .triton_metrics import count_refusal


class ModelArgs:
    """What ``initialize(args)`` gets, with typed access to the config's parameters and files."""

    def __init__(self, args: dict[str, str]) -> None:
        self.config = json.loads(args["model_config"])
        self.name: str = self.config["name"]
        self.directory = Path(args["model_repository"]) / args["model_version"]
        self.parameters = {k: v["string_value"] for k, v in self.config.get("parameters", {}).items()}

    def file(self, name: str) -> str:
        return str(self.directory / name)

    def int(self, key: str) -> int:
        return int(self.parameters[key])

    def bool(self, key: str) -> bool:
        return self.parameters[key] == "true"


def input_array(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def input_bytes_list(request: Any, name: str) -> list[bytes]:
    array = input_array(request, name)
    return [] if array is None else [bytes(item) for item in array.reshape(-1)]


def input_scalar(request: Any, name: str, default: Any, cast: Callable[[Any], Any]) -> Any:
    array = input_array(request, name)
    if array is None:
        return default
    if array.size != 1:
        raise RequestError(f"{name}: expected one value, got {array.size}")
    return cast(array.reshape(-1)[0])


def output_tensors(outputs: dict[str, np.ndarray]) -> list[Any]:
    return [pb_utils.Tensor(name, value) for name, value in outputs.items()]


def answer_outputs(text: str, tokens: Any) -> dict[str, np.ndarray]:
    """An answer (or a chunk of one) as the contract's outputs."""
    return {TEXT_OUTPUT.name: np.array([text.encode("utf-8")], dtype=np.object_), OUTPUT_IDS.name: np.asarray(tokens, dtype=np.int64)}


def error_response(exc: BaseException, model: str) -> Any:
    """Client errors carry their own message and status INVALID_ARGUMENT, a full server UNAVAILABLE;
    anything else is an internal error."""
    if isinstance(exc, RequestError):
        count_refusal(model, "invalid_argument")
        error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
    elif isinstance(exc, ServerBusy):
        count_refusal(model, "busy")
        error = pb_utils.TritonError(str(exc), pb_utils.TritonError.UNAVAILABLE)
    else:
        pb_utils.Logger.log_error(f"{model}: {''.join(traceback.format_exception(exc))}")
        error = pb_utils.TritonError(f"{model}: internal error: {type(exc).__name__}: {exc}")
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def forwarded_error(message: str) -> Any:
    """An error a BLS call returned, answered to our own client. Triton 2.51 hands a BLS caller every
    error as INTERNAL; the kind is told by the text :func:`error_response` writes, so the client still
    gets INVALID_ARGUMENT for what it can fix and UNAVAILABLE for a full server."""
    if ": internal error: " in message:
        code = pb_utils.TritonError.INTERNAL
    elif message.startswith(BUSY_PREFIX):
        code = pb_utils.TritonError.UNAVAILABLE
    else:
        code = pb_utils.TritonError.INVALID_ARG
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def respond_each(requests: list[Any], model: str, handle: Callable[[Any], dict[str, np.ndarray]]) -> list[Any]:
    """One response per request; a failing request gets an error response and the others go on."""
    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=output_tensors(handle(request))))
        except Exception as exc:  # noqa: BLE001 - every failure becomes that request's error response
            responses.append(error_response(exc, model))
    return responses


def respond_together(requests: list[Any], model: str, handle: Callable[[list[Any]], list[dict[str, np.ndarray]]]) -> list[Any]:
    """One call for all the requests Triton batched; if it fails, each request alone, so only a bad
    request gets an error and the others it was batched with are still answered."""
    try:
        return [pb_utils.InferenceResponse(output_tensors=output_tensors(outputs)) for outputs in handle(requests)]
    except Exception:  # noqa: BLE001 - told apart below, request by request
        return respond_each(requests, model, lambda request: handle([request])[0])


def read_sampling_params(request: Any, default_max_tokens: int, max_tokens_cap: int) -> SamplingParams:
    """The optional sampling inputs of the client contract, validated; absent ones take defaults."""
    sent = {t.name: input_scalar(request, t.name, None, t.scalar_type) for t in SAMPLING_INPUTS}
    params = SamplingParams(**{"max_tokens": default_max_tokens, **{k: v for k, v in sent.items() if v is not None}})
    return params.validate(max_tokens_cap)

