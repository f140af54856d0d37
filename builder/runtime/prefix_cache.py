"""The KV cache of earlier sequences, reused by later prefills that start the same way.

A causal model's KV at a position depends on everything up to it: the token ids, the encoders' embeddings placed
at image and audio placeholders, and the positions (M-RoPE's follow the images). So a kept sequence is keyed
position by position by what the graph reads there (:class:`PrefixKey`), and a later prompt reuses the KV of the
longest prefix equal in all of it, then runs only the rest. Kept are each prompt at its prefill (requests share
BOS and the system prompt: over 500 tokens for Mistral Small's) and each finished sequence's prompt + answer: a
conversation's next turn starts with all of it (multi-turn chat is where this pays most), as far as the chat
template writes the answer back as the same tokens (the match stops where it does not). Bounded in bytes, least
recently used first out; a kept sequence that a newer one extends is dropped.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PrefixKey:
    """What the KV at each position of a sequence depends on."""

    tokens: np.ndarray  # [S] int64: the token id; at an image/audio placeholder, a negative digest of its run's embeddings
    positions: np.ndarray  # [rows, S] int64: the positions the graph was given
    media: np.ndarray  # [S] bool: placeholder positions

    @classmethod
    def of_prompt(cls, input_ids: np.ndarray, multimodal_embeds: np.ndarray, multimodal_mask: np.ndarray,
                  position_ids: np.ndarray) -> PrefixKey:
        mask = np.asarray(multimodal_mask, dtype=bool)
        tokens = np.array(input_ids, dtype=np.int64)
        edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
        for start, end in zip(edges[::2], edges[1::2]):  # one run of placeholders: one image or clip
            digest = hashlib.blake2b(np.ascontiguousarray(multimodal_embeds[start:end]).data, digest_size=8)
            digest.update(tokens[start:end].data)  # the placeholder ids too
            tokens[start:end] = -1 - (int.from_bytes(digest.digest(), "little") >> 1)
        return cls(tokens, np.array(position_ids, dtype=np.int64), mask)

    def extended(self, tokens: list[int], first_position: int) -> PrefixKey:
        """This key followed by decoded ``tokens``, the first at ``first_position`` (every row), one apart."""
        rows = self.positions.shape[0]
        added = np.broadcast_to(np.arange(first_position, first_position + len(tokens), dtype=np.int64), (rows, len(tokens)))
        return PrefixKey(np.concatenate([self.tokens, np.array(tokens, dtype=np.int64)]),
                         np.concatenate([self.positions, added], axis=1), np.concatenate([self.media, np.zeros(len(tokens), bool)]))

    @property
    def length(self) -> int:
        return int(self.tokens.size)

    def shared(self, other: PrefixKey) -> int:
        """Positions at the start where both sequences' KV is the same."""
        n = min(self.length, other.length)
        differ = np.flatnonzero((self.tokens[:n] != other.tokens[:n]) | (self.positions[:, :n] != other.positions[:, :n]).any(axis=0))
        return int(differ[0]) if differ.size else n

    def whole_runs(self, length: int) -> int:
        """``length`` cut back to the start of the image or clip it would end inside: a run is prefilled whole (Gemma 3's
        image tokens attend to each other both ways)."""
        while 0 < length < self.length and self.media[length - 1] and self.media[length]:
            length -= 1
        return length


@dataclass(frozen=True)
class PrefixHit:
    length: int  # positions reused
    past: list[np.ndarray]  # per KV tensor [kv_heads, length, head_dim]


class PrefixCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[int, tuple[PrefixKey, list[np.ndarray]]] = OrderedDict()
        self._bytes = 0
        self._next = 0
        self._lock = threading.Lock()
        self.hits = self.lookups = self.reused_tokens = 0

    def lookup(self, key: PrefixKey) -> PrefixHit | None:
        """The longest kept prefix of this prompt, leaving at least one position to run (its logits)."""
        best_id, best = None, 0
        with self._lock:
            self.lookups += 1
            for entry_id, (kept, _) in self._entries.items():
                shared = key.whole_runs(min(kept.shared(key), key.length - 1))
                if shared > best:
                    best_id, best = entry_id, shared
            if best_id is None:
                return None
            self._entries.move_to_end(best_id)
            self.hits += 1
            self.reused_tokens += best
            past = self._entries[best_id][1]
        return PrefixHit(best, [kv[:, :best] for kv in past])

    def store(self, key: PrefixKey, present: list[np.ndarray]) -> None:
        """Keeps the KV of the sequence ``key`` describes (``present``: per KV tensor [kv_heads, positions, head_dim])."""
        length = key.length
        if length == 0:
            return
        with self._lock:
            for entry_id, (kept, _) in self._entries.items():
                if kept.length >= length and kept.shared(key) == length:  # already covered
                    self._entries.move_to_end(entry_id)
                    return
            kv = [p[:, :length] for p in present]
            size = _size(key, kv)
            if size > self.capacity_bytes:  # before copying: a long sequence may hold hundreds of MB
                return
            kv = [np.ascontiguousarray(k) for k in kv]
            for entry_id in [i for i, (kept, _) in self._entries.items() if kept.shared(key) == kept.length]:  # extended
                self._bytes -= _size(*self._entries.pop(entry_id))
            while self._bytes + size > self.capacity_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= _size(*old)
            self._entries[self._next] = (key, kv)
            self._next += 1
            self._bytes += size

    @property
    def size_bytes(self) -> int:
        return self._bytes


def _size(key: PrefixKey, kv: list[np.ndarray]) -> int:
    return key.tokens.nbytes + key.positions.nbytes + key.media.nbytes + sum(k.nbytes for k in kv)
