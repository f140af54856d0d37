"""Fixed-square images (Gemma 3): squashed to one ``longest_edge`` square (a single cell). The template emits the
marker ``token_text`` once per image, replaced in the rendered text by ``expansion`` before tokenizing (its newlines
merge with the text around it), which holds ``tokens_per_image`` of ``token``.
"""

from __future__ import annotations

import numpy as np

from ..contract import PIXEL_VALUES
from .base import ImageLayout


class FixedLayout(ImageLayout):
    batchable = True
    expanded_in_text = True

    def resized_size(self, height: int, width: int, index: int) -> tuple[int, int]:
        return self.image.longest_edge, self.image.longest_edge

    def placeholders(self, height: int, width: int) -> list[int]:
        return [self.image.token] * self.image.tokens_per_image

    def most_tokens(self) -> int:
        return self.image.tokens_per_image

    def graph_feeds(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        return {PIXEL_VALUES: pixels}
