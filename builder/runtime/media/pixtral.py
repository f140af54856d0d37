"""Pixtral's images (Mistral 3): kept at their own aspect ratio, scaled down to ``longest_edge``, sides rounded up to
whole cells. The template emits ``token`` once per image, which expands (on token ids) to rows of ``token`` x cols,
each ended by ``row_break``, the very last by ``end``.
"""

from __future__ import annotations

import numpy as np

from ..contract import PIXEL_VALUES
from ..errors import RequestError
from ..image import resized_size
from .base import ImageLayout


class PixtralLayout(ImageLayout):
    batchable = True
    expanded_in_text = False

    def resized_size(self, height: int, width: int, index: int) -> tuple[int, int]:
        image = self.image
        size = resized_size(height, width, image.longest_edge, image.cell)
        if not all(size):  # e.g. 1 x 5000: scaled to fit, one side rounds down to nothing
            raise RequestError(f"image[{index}]: {width}x{height} is too narrow to keep a pixel per side once scaled "
                               f"to a longest edge of {image.longest_edge}")
        return size

    def placeholders(self, height: int, width: int) -> list[int]:
        image = self.image
        ids: list[int] = []
        for _ in range(height // image.cell):
            ids += [image.token] * (width // image.cell) + [image.row_break]
        ids[-1] = image.end
        return ids

    def most_tokens(self) -> int:
        longest = self.image.longest_edge
        return len(self.placeholders(*resized_size(longest, longest, longest, self.image.cell)))

    def graph_feeds(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        return {PIXEL_VALUES: pixels}
