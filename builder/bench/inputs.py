"""The benchmark's requests, made deterministically from a prompt, a PNG image and a WAV clip.

The same requests feed perf_analyzer (as ``--input-data`` JSON) and the baselines.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from builder.runtime.contract import AUDIO_FRAMES, IMAGE_SIZES, INPUT_FEATURES, PIXEL_VALUES
from builder.runtime.preprocess import Preprocessor
from builder.serve.client import Request

AUDIO_RATE = 16000


def gradient_png(width: int = 96, height: int = 72) -> bytes:
    """A smooth colour gradient with a bright square: a real PNG, the same bytes on every run."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    rgb[height // 4: height // 2, width // 4: width // 2] = 250
    out = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def chord_wav(seconds: float = 1.5, frequencies: tuple[float, ...] = (220.0, 330.0)) -> bytes:
    """A 16 kHz mono 16-bit WAV of a few sine tones."""
    t = np.arange(int(seconds * AUDIO_RATE)) / AUDIO_RATE
    signal = sum(np.sin(2 * np.pi * f * t) for f in frequencies) / (2 * len(frequencies))
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(AUDIO_RATE)
        w.writeframes((signal * 32767).astype("<i2").tobytes())
    return out.getvalue()


@dataclass(frozen=True)
class Case:
    name: str
    request: Request


def mixes(max_tokens: int, images: bool = True, audio: bool = True) -> dict[str, tuple[Case, ...]]:
    """``mixed``: text, text+image, text+audio and all three, in turn, of the media the model takes (``images``,
    ``audio``); ``text``: text-only requests."""
    image, clip = gradient_png(), chord_wav()

    def case(name: str, prompt: str, images: tuple[bytes, ...] = (), audio: tuple[bytes, ...] = ()) -> Case:
        return Case(name, Request(prompt, images=images, audio=audio, max_tokens=max_tokens))

    text = case("text", "Write a short story about a lighthouse keeper and a storm.")
    mixed = (
        text,
        *([case("text+image", "Describe this picture in detail.", images=(image,))] if images else []),
        *([case("text+audio", "What do you hear in this recording?", audio=(clip,))] if audio else []),
        *([case("text+image+audio", "Does the sound match the picture?", images=(image,), audio=(clip,))]
          if images and audio else []),
    )
    return {"mixed": mixed, "text": (text, case("text-2", "List three facts about the Moon."))}


def _bytes_tensor(items: tuple[bytes, ...]) -> dict[str, object]:
    """A BYTES tensor in perf_analyzer's JSON: base64 of Triton's serialization (uint32 length + bytes each)."""
    serialized = b"".join(struct.pack("<I", len(item)) + item for item in items)
    return {"b64": base64.b64encode(serialized).decode("ascii"), "shape": [len(items)]}


def ensemble_input_data(cases: tuple[Case, ...], stream: bool) -> dict[str, object]:
    """perf_analyzer ``--input-data`` for ``ensemble`` (or ``ensemble_stream`` with ``stream``): one step per case."""
    steps = []
    for c in cases:
        step: dict[str, object] = {"text_input": [c.request.prompt], "max_tokens": [c.request.max_tokens]}
        if c.request.images:
            step["image"] = _bytes_tensor(c.request.images)
        if c.request.audio:
            step["audio"] = _bytes_tensor(c.request.audio)
        if stream:
            step["stream"] = [True]
        steps.append(step)
    return {"data": steps}


def encoder_input_data(tensors: dict[str, np.ndarray], batched: bool) -> dict[str, object]:
    """One step with the real tensors; a model with ``max_batch_size > 0`` takes shapes without the batch axis."""
    return {"data": [{name: {"content": values.reshape(-1).tolist(),
                             "shape": list(values.shape[1:] if batched else values.shape)}
                      for name, values in tensors.items()}]}


def encoder_tensors(preprocessor: Preprocessor, cases: tuple[Case, ...]) -> dict[str, dict[str, np.ndarray]]:
    """Each encoder model's inputs exactly as ``preprocess`` sends them for the first case carrying its media:
    one request, ``[1, items, ...]`` (no entry for a medium no case carries)."""
    tensors = {}
    image = next((c.request for c in cases if c.request.images), None)
    if image is not None:
        with_image = preprocessor(image.prompt, list(image.images), [])
        tensors["vision_encoder"] = {PIXEL_VALUES: with_image.pixel_values[None], IMAGE_SIZES: with_image.image_sizes[None]}
    audio = next((c.request for c in cases if c.request.audio), None)
    if audio is not None:
        with_audio = preprocessor(audio.prompt, [], list(audio.audio))
        tensors["audio_encoder"] = {INPUT_FEATURES: with_audio.input_features[None],
                                    AUDIO_FRAMES: with_audio.audio_frames[None]}
    return tensors


def write_json(path: Path, data: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path
