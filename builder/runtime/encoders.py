"""Running the encoder graphs on the media of one request or of several batched together, the same
way in Triton and in-process. Images come padded to the largest with their own sizes; the vision
graph takes same-size images, so each size (across all the requests) runs as one batch, and every
request gets its own embeddings back in image order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from .model_facts import ModelFacts
from .preprocess import ModelInputs, fuse_embeddings

EncoderRun = Callable[[np.ndarray], np.ndarray]  # a batch in -> [batch, tokens, hidden] out


def encode_images(run: EncoderRun, requests: Sequence[tuple[np.ndarray, np.ndarray]], hidden: int) -> list[np.ndarray]:
    """Per request ``[N, 3, Hmax, Wmax]`` pixels + ``[N, 2]`` sizes -> its ``[tokens, hidden]``, image after image."""
    images = [(r, i, tuple(int(v) for v in size)) for r, (_, sizes) in enumerate(requests) for i, size in enumerate(sizes)]
    pieces: dict[tuple[int, int], np.ndarray] = {}
    for height, width in dict.fromkeys(size for _, _, size in images):
        group = [(r, i) for r, i, size in images if size == (height, width)]
        embeds = run(np.ascontiguousarray(np.stack([requests[r][0][i, :, :height, :width] for r, i in group])))
        pieces.update(zip(group, embeds))
    return [_joined([pieces[(r, i)] for i in range(len(sizes))], hidden) for r, (_, sizes) in enumerate(requests)]


def encode_clips(run: EncoderRun, requests: Sequence[np.ndarray], hidden: int) -> list[np.ndarray]:
    """Per request ``[clips, mels, frames]`` -> its ``[tokens, hidden]``: all the clips in one run."""
    counts = [len(features) for features in requests]
    if not sum(counts):
        return [np.zeros((0, hidden), np.float32) for _ in requests]
    embeds = run(np.concatenate(requests))
    bounds = np.cumsum([0, *counts])
    return [_joined(list(embeds[start:end]), hidden) for start, end in zip(bounds[:-1], bounds[1:])]


def encode_requests(run: EncoderRun, requests: Sequence[Mapping[str, np.ndarray]], hidden: int) -> list[np.ndarray]:
    """Each request's encoder inputs (``pixel_values`` + ``image_sizes``, or ``input_features``) -> its embeddings."""
    if requests and "pixel_values" in requests[0]:
        return encode_images(run, [(r["pixel_values"], r["image_sizes"]) for r in requests], hidden)
    return encode_clips(run, [r["input_features"] for r in requests], hidden)


def _joined(pieces: list[np.ndarray], hidden: int) -> np.ndarray:
    return np.concatenate([p.reshape(-1, hidden) for p in pieces]) if pieces else np.zeros((0, hidden), np.float32)


def embed_request(inputs: ModelInputs, sessions: Mapping[str, ort.InferenceSession], facts: ModelFacts) -> tuple[np.ndarray, np.ndarray]:
    """What the ensemble does before the LLM, in this process: encode the media, place it at its tokens.

    ``sessions`` maps ``vision_encoder`` / ``audio_encoder`` to a session; one is used only when the
    request has that media, so a text-only request needs none.
    """
    def run(name: str) -> EncoderRun:
        return lambda batch: sessions[name].run(None, {sessions[name].get_inputs()[0].name: batch})[0]

    hidden = facts.hidden_size
    (image,) = encode_images(run("vision_encoder"), [(inputs.pixel_values, inputs.image_sizes)], hidden)
    (audio,) = encode_clips(run("audio_encoder"), [inputs.input_features], hidden)
    return fuse_embeddings(inputs.input_ids, image, audio, facts)
