"""What an image or audio layout answers: everything serving and the build decide per layout, asked by name.

A layout object wraps the facts of one model (``ImageFacts`` / ``AudioFacts``); the facts keep its name as data
(``layout``), so ``model_facts.json`` is the same whichever code reads it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from ..audio import AudioLimits
from ..model_facts import AudioFacts, ImageFacts


class ImageLayout(ABC):
    """How an image becomes a resized picture, placeholder tokens and vision-graph inputs."""

    # Triton's own backend can batch the vision graph (its inputs have an images axis).
    batchable: ClassVar[bool]
    # The template's marker is replaced by the placeholders in the rendered text (``ImageFacts.expansion``), before
    # tokenizing; otherwise :meth:`placeholders` replace the marker's token id afterwards.
    expanded_in_text: ClassVar[bool]

    def __init__(self, image: ImageFacts) -> None:
        self.image = image

    @abstractmethod
    def resized_size(self, height: int, width: int, index: int) -> tuple[int, int]:
        """(height, width) image ``index`` is resized to; a RequestError when this layout cannot take it."""

    @abstractmethod
    def placeholders(self, height: int, width: int) -> list[int]:
        """The placeholder token ids of one image resized to ``height`` x ``width``."""

    @abstractmethod
    def most_tokens(self) -> int:
        """Placeholder tokens of the largest image this layout makes."""

    @abstractmethod
    def graph_feeds(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Same-size images ``[N, 3, H, W]`` as the vision graph takes them."""


class AudioLayout(ABC):
    """How an audio input becomes encoder clips, their features, audio-graph inputs and embeddings."""

    # Triton's own backend can batch the audio graph (its inputs have a clips axis).
    batchable: ClassVar[bool]

    def __init__(self, audio: AudioFacts) -> None:
        self.audio = audio

    @property
    @abstractmethod
    def clip_width(self) -> int | None:
        """Mel frames of every clip in the features; None: each clip's own frames, a batch padded to its longest."""

    @abstractmethod
    def clip_frames(self, n_samples: int, rate: int, index: int, limits: AudioLimits) -> list[int]:
        """The mel frames each encoder clip of audio ``index`` attends to, from its length before resampling (cheap:
        called before resampling); a RequestError when this layout cannot take it."""

    @abstractmethod
    def features(self, decoded: list[tuple[np.ndarray, int]], frames: np.ndarray, filters: np.ndarray,
                 limits: AudioLimits) -> np.ndarray:
        """Decoded inputs (samples, rate) with each clip's ``frames`` -> float32 ``[clips, mels, width]``."""

    @abstractmethod
    def graph_feeds(self, features: np.ndarray, frames: np.ndarray) -> dict[str, np.ndarray]:
        """Clips ``[clips, mels, width]`` with each one's attended frames as the audio graph takes them."""

    @abstractmethod
    def clip_embeddings(self, embeds: np.ndarray, frames: np.ndarray) -> list[np.ndarray]:
        """The audio graph's output as each clip's ``[tokens, hidden]``: the tokens its frames give."""
