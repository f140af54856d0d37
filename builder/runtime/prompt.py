"""Token layout of a request: where the image and audio placeholders go in the prompt.

Shared by the server's ``preprocess`` model and by the PyTorch reference in the tests, so both
see the same token ids. The layout follows the Mistral-3 / Voxtral processors:
``<s>[INST]`` + per image ``h`` rows of ``[IMG] x w`` ended by ``[IMG_BREAK]`` (the very last by
``[IMG_END]``) + per audio file ``[BEGIN_AUDIO]`` and ``[AUDIO]`` x tokens + the text + ``[/INST]``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecialTokens:
    bos: int
    eos: int
    inst: int
    inst_end: int
    image: int
    image_break: int
    image_end: int
    audio: int
    begin_audio: int


@dataclass(frozen=True)
class PromptLayout:
    tokens: SpecialTokens
    image_grid: tuple[int, int]  # placeholder rows x columns per image (after the patch merger)
    audio_tokens_per_clip: int

    def image_placeholders(self) -> list[int]:
        rows, cols = self.image_grid
        ids: list[int] = []
        for _ in range(rows):
            ids += [self.tokens.image] * cols + [self.tokens.image_break]
        ids[-1] = self.tokens.image_end
        return ids

    def audio_placeholders(self, clips: int) -> list[int]:
        return [self.tokens.begin_audio] + [self.tokens.audio] * (self.audio_tokens_per_clip * clips)

    def prompt_ids(self, text_ids: list[int], images: int, audio_clips: list[int]) -> list[int]:
        """``audio_clips`` holds the number of encoder clips of each audio file."""
        ids = [self.tokens.bos, self.tokens.inst]
        for _ in range(images):
            ids += self.image_placeholders()
        for clips in audio_clips:
            ids += self.audio_placeholders(clips)
        return ids + text_ids + [self.tokens.inst_end]
