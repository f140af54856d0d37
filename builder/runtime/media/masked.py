"""One masked window (Qwen2-Audio): an audio input is one window, its padding masked inside the encoder; the tokens
follow the clip's own frames. Longer audio is refused: the model's processor would cut it. Otherwise as
:mod:`.windows`.
"""

from __future__ import annotations

from ..audio import AudioLimits, window_frames
from .windows import WindowsLayout


class MaskedLayout(WindowsLayout):
    def clip_frames(self, n_samples: int, rate: int, index: int, limits: AudioLimits) -> list[int]:
        return [window_frames(n_samples, rate, self.audio, index)]
