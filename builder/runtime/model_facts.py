"""What the serving side needs to know about the model, written once by the build as JSON.

Every Python-backend model reads the same ``model_facts.json`` (path passed as a config parameter),
so token ids and shapes live in one place.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from builder.runtime.prompt import PromptLayout, SpecialTokens


@dataclass(frozen=True)
class ModelFacts:
    tokens: SpecialTokens
    vocab_size: int
    hidden_size: int  # of the language model: width of every projected image/audio embedding
    num_layers: int
    num_kv_heads: int
    head_dim: int
    # vision
    image_size: int
    image_grid: tuple[int, int]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    # audio
    num_mel_bins: int
    clip_samples: int  # 16 kHz samples per encoder clip
    audio_tokens_per_clip: int

    @property
    def layout(self) -> PromptLayout:
        return PromptLayout(self.tokens, self.image_grid, self.audio_tokens_per_clip)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelFacts":
        raw = json.loads(Path(path).read_text())
        raw["tokens"] = SpecialTokens(**raw["tokens"])
        for key in ("image_grid", "image_mean", "image_std"):
            raw[key] = tuple(raw[key])
        return cls(**raw)
