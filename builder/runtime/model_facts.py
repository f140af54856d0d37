"""What the serving side needs to know about the model, written once by the build as JSON.

The model family decides every value at build time (token ids, processor parameters, placeholder
rules); serving reads them as data and never branches on the family. Every Python-backend model
reads the same ``model_facts.json``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ImageFacts:
    """How images become pixels and placeholder tokens. ``layout`` names the module of :mod:`.media` that says how
    (``IMAGE_LAYOUTS``): "pixtral" (Mistral 3), "fixed" (Gemma 3) or "qwen_vl" (Qwen2.5-Omni)."""

    token: int
    row_break: int
    end: int
    patch_size: int  # pixels per side of a vision patch
    merge_size: int  # patches per side merged into one placeholder
    longest_edge: int  # images are scaled down (never up) so their longest side fits
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    token_text: str  # the placeholder as the template writes it, e.g. "[IMG]"
    layout: str = "pixtral"  # "pixtral" | "fixed" | "qwen_vl"
    resample: str = "bicubic"  # Pillow's filter for the resize: "bicubic" | "bilinear"
    tokens_per_image: int = 0  # "fixed": the ``token``s in ``expansion``
    expansion: str = ""  # "fixed": the text each template marker becomes
    min_pixels: int = 0  # "qwen_vl": the resized area's bounds
    max_pixels: int = 0
    temporal_patch_size: int = 1  # "qwen_vl": frames per patch (a still image repeats itself)
    window_size: int = 0  # "qwen_vl": pixels per side of an attention window

    @property
    def cell(self) -> int:
        """Pixels per side of one placeholder token."""
        return self.patch_size * self.merge_size


@dataclass(frozen=True)
class AudioFacts:
    """Whisper-style audio: log-mel windows of ``clip_samples`` at 16 kHz, two mel frames per encoder position.

    ``layout`` names the module of :mod:`.media` that says how an audio input becomes encoder clips and placeholder
    tokens (``AUDIO_LAYOUTS``): "windows" (Voxtral), "masked" (Qwen2-Audio) or "chunked" (Qwen2.5-Omni).
    The chat template emits ``token`` once per audio input; it expands to ``begin`` (when the template does not
    write one itself) + ``token`` x the input's tokens.
    """

    token: int
    begin: int | None
    num_mel_bins: int
    clip_samples: int  # 16 kHz samples per encoder clip (window)
    hop_length: int  # samples per mel frame
    positions_per_token: int  # encoder positions pooled or stacked into one token
    layout: str  # "windows" | "masked" | "chunked"
    token_text: str
    chunk_frames: int = 0  # "chunked": mel frames per encoder chunk

    @property
    def frames(self) -> int:
        return self.clip_samples // self.hop_length

    def clip_tokens(self, frames: int) -> int:
        """Tokens of a clip whose encoder attends to ``frames`` mel frames (stride-2 convolution, then pooling)."""
        return ((frames - 1) // 2 + 1) // self.positions_per_token

    @property
    def tokens_per_clip(self) -> int:
        """Tokens of a whole window: every clip's in the "windows" layout, the most one clip gives when "masked"."""
        return self.clip_tokens(self.frames)


@dataclass(frozen=True)
class ModelFacts:
    family: str  # the model_type the build read; informational on the serving side
    vocab_size: int
    hidden_size: int  # of the language model: width of every projected image/audio embedding
    num_layers: int
    num_kv_heads: int
    head_dim: int
    stop_ids: tuple[int, ...]  # generation ends at any of these
    image: ImageFacts | None  # None: the checkpoint has no vision encoder
    audio: AudioFacts | None  # None: the checkpoint has no audio encoder
    # 3: the decoder takes M-RoPE positions (temporal, height, width) per token, which preprocessing computes from
    # the prompt's images; 1: plain positions 0, 1, 2...
    position_rows: int = 1
    max_positions: int = 0  # the decoder's trained context (its config's max_position_embeddings); 0: not stated

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelFacts":
        raw = json.loads(Path(path).read_text())
        if raw.get("image"):
            raw["image"] = ImageFacts(**{**raw["image"], "mean": tuple(raw["image"]["mean"]), "std": tuple(raw["image"]["std"])})
        if raw.get("audio"):
            raw["audio"] = AudioFacts(**raw["audio"])
        raw["stop_ids"] = tuple(raw["stop_ids"])
        return cls(**raw)
