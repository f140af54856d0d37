"""Whole windows (Voxtral): an audio input zero-padded to whole windows of ``clip_samples``, one log-mel over all of
it (as Voxtral's processor does), each window a clip of ``tokens_per_clip`` tokens.
"""

from __future__ import annotations

import numpy as np

from ..audio import AudioLimits, audio_feeds, audio_to_clips, clip_count, resample
from .base import AudioLayout


class WindowsLayout(AudioLayout):
    batchable = True

    @property
    def clip_width(self) -> int | None:
        return self.audio.frames

    def clip_frames(self, n_samples: int, rate: int, index: int, limits: AudioLimits) -> list[int]:
        return [self.audio.frames] * clip_count(n_samples, rate, self.audio.clip_samples, index, limits)

    def features(self, decoded: list[tuple[np.ndarray, int]], frames: np.ndarray, filters: np.ndarray,
                 limits: AudioLimits) -> np.ndarray:
        clips = [audio_to_clips(resample(samples, rate), filters, self.audio.clip_samples, i, limits)
                 for i, (samples, rate) in enumerate(decoded)]
        return np.concatenate(clips).astype(np.float32)

    def graph_feeds(self, features: np.ndarray, frames: np.ndarray) -> dict[str, np.ndarray]:
        return audio_feeds(features, frames)

    def clip_embeddings(self, embeds: np.ndarray, frames: np.ndarray) -> list[np.ndarray]:
        return [clip[: self.audio.clip_tokens(int(n))] for clip, n in zip(embeds, frames)]
