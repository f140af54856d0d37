"""Chunked clips (Qwen2.5-Omni): one window per input as in :mod:`.masked`, but a clip travels as its own frames only
(no window padding) and the encoder attends inside chunks of ``chunk_frames`` mel frames, its positions restarting
in each; the graph returns all the clips' tokens one after the other.
"""

from __future__ import annotations

import numpy as np

from ..audio import AudioLimits, resample, valid_frames_log_mel, window_frames
from .base import AudioLayout


class ChunkedLayout(AudioLayout):
    # One call's chunks with their index tensors: no clips axis a backend could batch on.
    batchable = False

    @property
    def clip_width(self) -> int | None:
        return None

    def clip_frames(self, n_samples: int, rate: int, index: int, limits: AudioLimits) -> list[int]:
        return [window_frames(n_samples, rate, self.audio, index)]

    def features(self, decoded: list[tuple[np.ndarray, int]], frames: np.ndarray, filters: np.ndarray,
                 limits: AudioLimits) -> np.ndarray:
        """Each clip's own frames, the request's clips padded to the longest."""
        batch = np.zeros((len(decoded), self.audio.num_mel_bins, int(frames.max())), np.float32)
        for i, ((samples, rate), n) in enumerate(zip(decoded, frames)):
            batch[i, :, :n] = valid_frames_log_mel(resample(samples, rate), filters, int(n))
        return batch

    def graph_feeds(self, features: np.ndarray, frames: np.ndarray) -> dict[str, np.ndarray]:
        """Qwen2.5-Omni's ``chunk_and_pad_features`` and the index helpers of its audio tower, in numpy: every clip's
        own frames cut into chunks of ``chunk_frames``, padded to the longest chunk; which convolved positions are
        real; the first of each pooled pair; the chunks' bounds."""
        audio = self.audio
        chunks = [features[c, :, start:min(start + audio.chunk_frames, int(n))]
                  for c, n in enumerate(frames) for start in range(0, int(n), audio.chunk_frames)]
        lengths = np.array([chunk.shape[1] for chunk in chunks], np.int64)
        padded = np.zeros((len(chunks), features.shape[1], int(lengths.max())), np.float32)
        for k, chunk in enumerate(chunks):
            padded[k, :, : chunk.shape[1]] = chunk
        convolved = (lengths - 1) // 2 + 1  # positions after the stride-2 convolution, per chunk
        valid = np.flatnonzero(np.arange(convolved.max())[None, :] < convolved[:, None])
        clip_convolved = (np.asarray(frames, np.int64) - 1) // 2 + 1
        starts = np.concatenate([[0], np.cumsum(clip_convolved)[:-1]])
        pool = np.concatenate([start + 2 * np.arange(audio.clip_tokens(int(n))) for start, n in zip(starts, frames)])
        return {"padded_feature": padded, "chunk_lengths": lengths, "valid_indices": valid.astype(np.int64),
                "pool_indices": pool.astype(np.int64), "cu_seqlens": np.concatenate([[0], np.cumsum(convolved)]).astype(np.int32)}

    def clip_embeddings(self, embeds: np.ndarray, frames: np.ndarray) -> list[np.ndarray]:
        """The graph's ``[all the clips' tokens, hidden]``, clip after clip."""
        return np.split(embeds, np.cumsum([self.audio.clip_tokens(int(n)) for n in frames])[:-1])
