"""Placeholder expansion: the chat template writes one marker per image or audio file, the model wants many.

Done on token ids after the template is rendered and tokenized, as the HF processors do on text:
each image marker becomes its layout's placeholders (:mod:`.media`; Pixtral's: rows of image tokens ended
by a row break, the last by an end token), each audio marker (a begin token and) the audio tokens of all its clips.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import RequestError
from .media import image_layout
from .model_facts import AudioFacts, ImageFacts, ModelFacts


def audio_placeholders(audio: AudioFacts, clip_frames: Sequence[int]) -> list[int]:
    """The tokens of one audio input whose clips' encoders attend to ``clip_frames`` mel frames each."""
    begin = [audio.begin] if audio.begin is not None else []
    return begin + [audio.token] * sum(audio.clip_tokens(frames) for frames in clip_frames)


def expand_placeholders(
    ids: Sequence[int], facts: ModelFacts, image_sizes: Sequence[tuple[int, int]], audio_clips: Sequence[Sequence[int]]
) -> list[int]:
    """Replaces the n-th image marker by image n's tokens and the n-th audio marker by audio n's
    (``audio_clips``: per audio input, the mel frames of each of its clips)."""
    expansions: dict[int, list[list[int]]] = {}
    layout = image_layout(facts.image) if facts.image is not None else None
    if layout is not None and layout.expanded_in_text:  # in the text already: count them
        found = sum(1 for i in ids if i == layout.image.token)
        wanted = sum(len(layout.placeholders(h, w)) for h, w in image_sizes)
        if found != wanted:
            raise RequestError(f"chat template placed {found} image tokens for {len(image_sizes)} images")
    elif layout is not None:
        expansions[layout.image.token] = [layout.placeholders(h, w) for h, w in image_sizes]
    if facts.audio is not None:
        expansions[facts.audio.token] = [audio_placeholders(facts.audio, frames) for frames in audio_clips]
    wanted = {token: len(items) for token, items in expansions.items()}
    found = {token: sum(1 for i in ids if i == token) for token in expansions}
    if found != wanted:  # a template that drops or repeats media: a build-time bug, but say so per request
        raise RequestError(f"chat template placed {found} media markers for {wanted} inputs (token id: count)")
    out: list[int] = []
    used = dict.fromkeys(expansions, 0)
    for token in ids:
        if token in expansions:
            out += expansions[token][used[token]]
            used[token] += 1
        else:
            out.append(token)
    return out


def mrope_positions(ids: Sequence[int], image: ImageFacts | None, image_sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """[3, S] M-RoPE positions (temporal, height, width) of an expanded prompt, as Qwen2.5-Omni's ``get_rope_index``
    gives them for images and audio: a text or audio token is one step on all three rows; image n's tokens, a run of
    rows x cols cells from position p, get (p, p + row, p + col); after each block the next position is its largest
    plus one. Before the first image every row equals the plain positions 0, 1, 2... (so prefixes cache as text)."""
    positions = np.zeros((3, len(ids)), np.int64)
    token = image.token if image is not None else None
    next_position, i, n = 0, 0, 0
    while i < len(ids):
        if ids[i] == token:
            rows, cols = image_sizes[n][0] // image.cell, image_sizes[n][1] // image.cell
            count = rows * cols
            positions[0, i:i + count] = next_position
            positions[1, i:i + count] = next_position + np.repeat(np.arange(rows), cols)
            positions[2, i:i + count] = next_position + np.tile(np.arange(cols), rows)
            next_position += max(rows, cols)
            i, n = i + count, n + 1
        else:
            positions[:, i] = next_position
            next_position, i = next_position + 1, i + 1
    return positions
