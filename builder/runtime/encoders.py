"""Running the encoder graphs on the media of one request or of several batched together, the same
way in Triton and in-process. Images come padded to the largest with their own sizes; the vision
graph takes same-size images, so each size (across all the requests) runs as one batch, and every
request gets its own embeddings back in image order. Clips come with the mel frames each one's encoder
attends to: a graph that masks padding takes them as ``feature_attention_mask``, and each clip keeps the
tokens its frames give.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from .contract import AUDIO_FRAMES, IMAGE_SIZES, INPUT_FEATURES, PIXEL_VALUES
from .media import audio_layout, image_layout
from .model_facts import AudioFacts, ImageFacts, ModelFacts
from .preprocess import ModelInputs, fuse_embeddings

# Graph inputs by name -> [batch, tokens, hidden]; given more inputs than its graph takes, a run uses its own.
EncoderRun = Callable[[dict[str, np.ndarray]], np.ndarray]


def encoder_session(path: str) -> ort.InferenceSession:
    """An encoder graph on ONNX Runtime's CPU provider, its threads idle between runs. An encoder runs once per
    request and something else runs next (the other encoder, prefill, decode steps): by default ORT's threads
    spin on after a run and hold the cores it needs (one process, an image then a clip: 167 ms, 127 without)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def session_run(session: ort.InferenceSession, output: str | None = None) -> EncoderRun:
    """An ONNX Runtime session as an :data:`EncoderRun` (its first output unless ``output`` names one)."""
    names = [i.name for i in session.get_inputs()]
    return lambda feeds: session.run([output] if output else None, {name: feeds[name] for name in names})[0]


def encode_images(run: EncoderRun, requests: Sequence[tuple[np.ndarray, np.ndarray]], image: ImageFacts,
                  hidden: int) -> list[np.ndarray]:
    """Per request ``[N, 3, Hmax, Wmax]`` pixels + ``[N, 2]`` sizes -> its ``[tokens, hidden]``, image after image."""
    images = [(r, i, tuple(int(v) for v in size)) for r, (_, sizes) in enumerate(requests) for i, size in enumerate(sizes)]
    layout = image_layout(image)
    pieces: dict[tuple[int, int], np.ndarray] = {}
    for height, width in dict.fromkeys(size for _, _, size in images):
        group = [(r, i) for r, i, size in images if size == (height, width)]
        pixels = np.ascontiguousarray(np.stack([requests[r][0][i, :, :height, :width] for r, i in group]))
        embeds = run(layout.graph_feeds(pixels)).reshape(len(group), -1, hidden)
        pieces.update(zip(group, embeds))
    return [_joined([pieces[(r, i)] for i in range(len(sizes))], hidden) for r, (_, sizes) in enumerate(requests)]


def encode_clips(run: EncoderRun, requests: Sequence[tuple[np.ndarray, np.ndarray]], audio: AudioFacts,
                 hidden: int) -> list[np.ndarray]:
    """Per request ``[clips, mels, frames]`` + each clip's attended frames -> its ``[tokens, hidden]``: all the
    clips in one run, each keeping the tokens its frames give."""
    counts = [len(features) for features, _ in requests]
    if not sum(counts):
        return [np.zeros((0, hidden), np.float32) for _ in requests]
    frames = np.concatenate([f for _, f in requests])
    longest = max(features.shape[-1] for features, _ in requests if len(features))  # "chunked": requests' own widths
    features = np.concatenate([np.pad(f, ((0, 0), (0, 0), (0, longest - f.shape[-1]))) for f, _ in requests])
    layout = audio_layout(audio)
    kept = layout.clip_embeddings(run(layout.graph_feeds(features, frames)), frames)
    bounds = np.cumsum([0, *counts])
    return [_joined(kept[start:end], hidden) for start, end in zip(bounds[:-1], bounds[1:])]


def encode_requests(run: EncoderRun, requests: Sequence[Mapping[str, np.ndarray]], facts: ModelFacts) -> list[np.ndarray]:
    """Each request's encoder inputs (``pixel_values`` + ``image_sizes``, or ``input_features`` + ``audio_frames``)
    -> its embeddings."""
    if requests and PIXEL_VALUES in requests[0]:
        assert facts.image is not None
        return encode_images(run, [(r[PIXEL_VALUES], r[IMAGE_SIZES]) for r in requests], facts.image, facts.hidden_size)
    assert facts.audio is not None
    return encode_clips(run, [(r[INPUT_FEATURES], r[AUDIO_FRAMES]) for r in requests], facts.audio, facts.hidden_size)


def _joined(pieces: list[np.ndarray], hidden: int) -> np.ndarray:
    return np.concatenate([p.reshape(-1, hidden) for p in pieces]) if pieces else np.zeros((0, hidden), np.float32)


def embed_request(inputs: ModelInputs, sessions: Mapping[str, ort.InferenceSession], facts: ModelFacts) -> tuple[np.ndarray, np.ndarray]:
    """What the ensemble does before the LLM, in this process: encode the media, place it at its tokens.

    ``sessions`` maps ``vision_encoder`` / ``audio_encoder`` to a session; one is used only when the
    request has that media, so a text-only request needs none.
    """
    def run(name: str) -> EncoderRun:
        return lambda feeds: session_run(sessions[name])(feeds)

    hidden = facts.hidden_size
    (image,) = encode_images(run("vision_encoder"), [(inputs.pixel_values, inputs.image_sizes)], facts.image, hidden) \
        if facts.image is not None else (np.zeros((0, hidden), np.float32),)
    audio = encode_clips(run("audio_encoder"), [(inputs.input_features, inputs.audio_frames)], facts.audio, hidden)[0] \
        if facts.audio is not None else np.zeros((0, hidden), np.float32)
    return fuse_embeddings(inputs.input_ids, image, audio, facts)
