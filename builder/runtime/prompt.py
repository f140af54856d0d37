"""Placeholder expansion: the chat template writes one marker per image or audio file, the model wants many.

Done on token ids after the template is rendered and tokenized, as the HF processors do on text:
each image marker becomes rows of image tokens ended by a row break (the last by an end token),
each audio marker (a begin token and) the audio tokens of all its clips.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import RequestError
from .model_facts import AudioFacts, ImageFacts, ModelFacts


def image_placeholders(image: ImageFacts, height: int, width: int) -> list[int]:
    """The tokens of one resized image of ``height`` x ``width`` pixels (multiples of ``image.cell``)."""
    rows, cols = height // image.cell, width // image.cell
    ids: list[int] = []
    for _ in range(rows):
        ids += [image.token] * cols + [image.row_break]
    ids[-1] = image.end
    return ids


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
    if facts.image is not None and facts.image.layout == "fixed":  # expanded in the text already: count them
        found, wanted = sum(1 for i in ids if i == facts.image.token), facts.image.tokens_per_image * len(image_sizes)
        if found != wanted:
            raise RequestError(f"chat template placed {found} image tokens for {len(image_sizes)} images")
    elif facts.image is not None:
        expansions[facts.image.token] = [image_placeholders(facts.image, h, w) for h, w in image_sizes]
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
