"""The KV cache of every sequence being decoded, held once and written in place by the LLM graph.

One buffer per KV tensor, ``[rows, kv_heads, capacity, head_dim]``; a sequence owns a row from its prefill to its
end, its positions from 0 up. A graph whose attention updates the cache in place (``builder.compile.ort_llm_graph``)
is bound to rows ``[0, n)`` of every buffer as both its past and its present: a step writes each sequence's new key
and value after its own length and copies nothing else. A step over sequences that are not in rows ``0..n-1`` in
that order first moves them there (a swap of two rows' used positions): that happens when a sequence arrives or
leaves, not between steps of the same batch.

The buffers are allocated zeroed and grow by doubling; the operating system commits a page of them only when a
position on it is first written, so an unused row or position costs address space, not memory.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np


class KvSlots:
    def __init__(self, names: list[str], kv_heads: int, head_dim: int, dtype: type, rows: int = 1,
                 capacity: int = 256) -> None:
        self.names, self.dtype = names, dtype
        self.shape = (kv_heads, head_dim)
        self.buffers = {name: np.zeros((rows, kv_heads, capacity, head_dim), dtype=dtype) for name in names}
        self.owners: list[weakref.ref[Any] | None] = [None] * rows
        self.lengths = [0] * rows  # positions of each row that hold a sequence's cache (what a move copies)
        self.generation = 0  # counts reallocations: memory bound to a graph before one is gone

    @property
    def rows(self) -> int:
        return len(self.owners)

    @property
    def capacity(self) -> int:
        return next(iter(self.buffers.values())).shape[2]

    def row_of(self, owner: Any) -> int | None:
        return next((row for row, ref in enumerate(self.owners) if ref is not None and ref() is owner), None)

    def claim(self, owner: Any, positions: int) -> int:
        """A free row for ``owner`` (a sequence that is gone frees its row), with room for ``positions``."""
        self.reserve(positions)
        row = next((r for r, ref in enumerate(self.owners) if ref is None or ref() is None), None)
        if row is None:
            row = self.rows
            self._resize(self.rows * 2, self.capacity)
        self.owners[row], self.lengths[row] = weakref.ref(owner), 0
        return row

    def release(self, owner: Any) -> None:
        row = self.row_of(owner)
        if row is not None:
            self.owners[row], self.lengths[row] = None, 0

    def reserve(self, positions: int) -> None:
        """Room for ``positions`` in every row."""
        if positions > self.capacity:
            capacity = self.capacity
            while capacity < positions:
                capacity *= 2
            self._resize(self.rows, capacity)

    def arrange(self, owners: list[Any]) -> None:
        """``owners[i]`` in row ``i``; whatever was there moves to where it was."""
        for target, owner in enumerate(owners):
            row = self.row_of(owner)
            assert row is not None, "a sequence decodes only after its prefill claimed a row"
            if row != target:
                self._swap(row, target)

    def rows_view(self, start: int, count: int) -> dict[str, np.ndarray]:
        """Rows ``[start, start + count)`` of every buffer: contiguous (the row is the outermost axis), no copy."""
        return {name: buffer[start:start + count] for name, buffer in self.buffers.items()}

    def read(self, row: int, length: int) -> list[np.ndarray]:
        """A copy of the row's first ``length`` positions, per KV tensor [kv_heads, length, head_dim]."""
        return [buffer[row, :, :length].copy() for buffer in self.buffers.values()]

    def write(self, row: int, cache: list[np.ndarray]) -> None:
        """Puts a kept cache (per KV tensor [kv_heads, length, head_dim]) at the start of ``row``."""
        for buffer, kv in zip(self.buffers.values(), cache):
            buffer[row, :, :kv.shape[1]] = kv
        self.lengths[row] = max(self.lengths[row], cache[0].shape[1] if cache else 0)

    def _swap(self, a: int, b: int) -> None:
        used = max(self.lengths[a], self.lengths[b])
        for buffer in self.buffers.values():
            kept = buffer[a, :, :used].copy()
            buffer[a, :, :used] = buffer[b, :, :used]
            buffer[b, :, :used] = kept
        self.owners[a], self.owners[b] = self.owners[b], self.owners[a]
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def _resize(self, rows: int, capacity: int) -> None:
        kv_heads, head_dim = self.shape
        for name, old in self.buffers.items():
            grown = np.zeros((rows, kv_heads, capacity, head_dim), dtype=self.dtype)
            for row, length in enumerate(self.lengths):
                if length:
                    grown[row, :, :length] = old[row, :, :length]
            self.buffers[name] = grown
            del old
        self.generation += 1
        self.owners += [None] * (rows - len(self.owners))
        self.lengths += [0] * (rows - len(self.lengths))
