"""The KV cache of prompt prefixes that requests share, computed once and reused by later prefills.

Every request of a chat-templated model starts with the same tokens (BOS, the system prompt: over
500 tokens for Mistral Small's); a causal model's KV at those positions depends on them alone. So
the prefill of each prompt's text is kept (up to its first image or audio placeholder: their
embeddings come from the encoders, not the ids), and a later prompt reuses the KV of the longest
prefix it shares with any kept one, token for token, and runs only the rest. Bounded in bytes,
least recently used first out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PrefixHit:
    length: int  # positions reused
    past: list[np.ndarray]  # per KV tensor [kv_heads, length, head_dim]


class PrefixCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[int, tuple[np.ndarray, list[np.ndarray]]] = OrderedDict()
        self._bytes = 0
        self._next = 0
        self._lock = threading.Lock()
        self.hits = self.lookups = self.reused_tokens = 0

    def lookup(self, input_ids: np.ndarray, multimodal_mask: np.ndarray) -> PrefixHit | None:
        """The longest kept prefix of this prompt's text, leaving at least one position to run (its logits)."""
        limit = min(_text_length(multimodal_mask), input_ids.size - 1)
        best_key, best = None, 0
        with self._lock:
            self.lookups += 1
            for key, (ids, _) in self._entries.items():
                shared = _common_prefix(ids, input_ids[:limit])
                if shared > best:
                    best_key, best = key, shared
            if best_key is None:
                return None
            self._entries.move_to_end(best_key)
            self.hits += 1
            self.reused_tokens += best
            past = self._entries[best_key][1]
        return PrefixHit(best, [kv[:, :best] for kv in past])

    def store(self, input_ids: np.ndarray, multimodal_mask: np.ndarray, present: list[np.ndarray]) -> None:
        """Keeps the KV of the prompt's text (``present``: per KV tensor [kv_heads, positions, head_dim])."""
        length = _text_length(multimodal_mask)
        if length == 0:
            return
        ids = np.array(input_ids[:length], dtype=np.int64)
        with self._lock:
            for key, (kept, _) in self._entries.items():
                if kept.size >= length and _common_prefix(kept, ids) == length:  # already covered
                    self._entries.move_to_end(key)
                    return
            kv = [np.ascontiguousarray(p[:, :length]) for p in present]
            size = ids.nbytes + sum(k.nbytes for k in kv)
            if size > self.capacity_bytes:
                return
            while self._bytes + size > self.capacity_bytes:
                _, (old_ids, old_kv) = self._entries.popitem(last=False)
                self._bytes -= old_ids.nbytes + sum(k.nbytes for k in old_kv)
            self._entries[self._next] = (ids, kv)
            self._next += 1
            self._bytes += size

    @property
    def size_bytes(self) -> int:
        return self._bytes


def _text_length(multimodal_mask: np.ndarray) -> int:
    """Positions before the first image/audio placeholder."""
    placeholders = np.flatnonzero(multimodal_mask)
    return int(placeholders[0]) if placeholders.size else int(multimodal_mask.size)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n
