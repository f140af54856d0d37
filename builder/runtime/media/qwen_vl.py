"""Qwen2-VL-style images (Qwen2.5-Omni): Qwen2-VL's ``smart_resize`` (sides rounded to whole cells, the area kept
within ``min_pixels``..``max_pixels``); the template's ``token`` expands to (height x width) / cell^2 of ``token``, one
per cell with no row breaks. The encoder takes each image as ``patch_size`` patches of ``temporal_patch_size`` frames,
merged ``merge_size`` x ``merge_size``, attended in windows of ``window_size`` pixels.
"""

from __future__ import annotations

import numpy as np

from ..errors import RequestError
from ..image import smart_resize
from .base import ImageLayout


class QwenVLLayout(ImageLayout):
    # One call's patches with their index tensors: no images axis a backend could batch on.
    batchable = False
    expanded_in_text = False

    def resized_size(self, height: int, width: int, index: int) -> tuple[int, int]:
        image = self.image
        size = smart_resize(height, width, image.cell, image.min_pixels, image.max_pixels)
        if not all(size):
            raise RequestError(f"image[{index}]: {width}x{height} has an aspect ratio over 200, which this model's "
                               f"processor refuses")
        return size

    def placeholders(self, height: int, width: int) -> list[int]:
        return [self.image.token] * ((height // self.image.cell) * (width // self.image.cell))

    def most_tokens(self) -> int:
        return self.image.max_pixels // self.image.cell**2  # the resized area is at most max_pixels

    def graph_feeds(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The patches (each ``[C, T, p, p]``, the still image repeated over T, ordered merge-group by merge-group)
        and the index tensors HF's vision helpers compute (``get_vision_position_ids``, ``get_vision_window_index``,
        the images' and windows' bounds)."""
        image = self.image
        count, channels, height, width = pixels.shape
        p, m, frames = image.patch_size, image.merge_size, image.temporal_patch_size
        rows, cols = height // p, width // p
        x = pixels.reshape(count, channels, rows // m, m, p, cols // m, m, p).transpose(0, 2, 5, 3, 6, 1, 4, 7)
        x = np.broadcast_to(x[:, :, :, :, :, :, None], (*x.shape[:6], frames, p, p))
        patches = np.ascontiguousarray(x.reshape(count * rows * cols, channels * frames * p * p))
        # (row, col) of each patch, merge-group major.
        grid_rows = np.arange(rows)[:, None].repeat(cols, 1).reshape(rows // m, m, cols // m, m).transpose(0, 2, 1, 3)
        grid_cols = np.arange(cols)[None, :].repeat(rows, 0).reshape(rows // m, m, cols // m, m).transpose(0, 2, 1, 3)
        rotary = np.tile(np.stack([grid_rows.reshape(-1), grid_cols.reshape(-1)], -1), (count, 1))
        # Windows of side cells of merged tokens, edge windows smaller; HF pads a whole extra window when a side divides.
        side, merged_rows, merged_cols = image.window_size // image.cell, rows // m, cols // m
        pad_rows, pad_cols = side - merged_rows % side, side - merged_cols % side
        index = np.pad(np.arange(merged_rows * merged_cols).reshape(merged_rows, merged_cols), ((0, pad_rows), (0, pad_cols)),
                       constant_values=-1)
        windows = index.reshape((merged_rows + pad_rows) // side, side, (merged_cols + pad_cols) // side, side)
        windows = windows.transpose(0, 2, 1, 3).reshape(-1, side * side)
        sizes = (windows >= 0).sum(1)
        order = windows.reshape(-1)
        order = order[order >= 0]
        per_image = merged_rows * merged_cols
        window_index = np.concatenate([order + k * per_image for k in range(count)])
        window_bounds = np.concatenate([[0], np.cumsum(np.tile(sizes[sizes > 0], count)) * m * m])
        return {"pixel_patches": patches, "rotary_pos_ids": rotary.astype(np.int64), "window_index": window_index.astype(np.int64),
                "cu_seqlens": (np.arange(count + 1) * rows * cols).astype(np.int32), "cu_window_seqlens": window_bounds.astype(np.int32)}
