"""The autoregressive loop over the exported LLM graph, with the KV cache kept between steps.

One ONNX graph serves prefill (the whole prompt, empty past) and decode (one token, growing past).
Sampling is greedy by default; temperature / top-k / top-p / seed follow the usual HF semantics.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from .contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    KV_IN_PLACE,
    KV_LAYOUT_KEY,
    LOGITS,
    MULTIMODAL_EMBEDS,
    MULTIMODAL_MASK,
    PAST_PREFIX,
    POSITION_IDS,
    PRESENT_PREFIX,
)
from .errors import RequestError
from .kv_slots import KvSlots
from .model_facts import ModelFacts
from .prefix_cache import PrefixCache, PrefixKey


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0
    seed: int | None = None

    def validate(self, max_tokens_cap: int) -> "SamplingParams":
        if not 1 <= self.max_tokens <= max_tokens_cap:
            raise RequestError(f"max_tokens: {self.max_tokens} is outside 1..{max_tokens_cap}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature: {self.temperature} must be a finite number >= 0")
        if self.top_k < 0:
            raise RequestError(f"top_k: {self.top_k} must be >= 0 (0 disables it)")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise RequestError(f"top_p: {self.top_p} must be in (0, 1]")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def choose_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    if params.greedy:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / params.temperature
    if params.top_k:
        kth = np.partition(scores, -params.top_k)[-params.top_k] if params.top_k < scores.size else -np.inf
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, params.top_p)) + 1]  # smallest set reaching top_p
        filtered = np.zeros_like(probs)
        filtered[keep] = probs[keep]
        probs = filtered / filtered.sum()
    return int(rng.choice(probs.size, p=probs))


@dataclass(eq=False)
class Sequence:
    """One request being decoded: its own KV cache, sampling state and the logits of its next token."""

    params: SamplingParams
    stop_ids: frozenset[int]
    rng: np.random.Generator
    past: Any  # the runner's cache: per KV tensor [kv_heads, length, head_dim], device memory, or None (held by the runner)
    length: int  # positions in the cache
    logits: np.ndarray  # [vocab] for the next token
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    position_offset: int = 0  # a decode step's position is length + this (M-RoPE: the prompt's images shift it)
    prompt_key: PrefixKey | None = None  # the prompt as the prefix cache keys it (None without one)

    def next_token(self) -> int | None:
        """Chooses the next token; None (and finished) on a stop id. Finished after max_tokens."""
        token = choose_token(self.logits, self.params, self.rng)
        if token in self.stop_ids:
            self.finished = True
            return None
        self.tokens.append(token)
        self.finished = len(self.tokens) >= self.params.max_tokens
        return token


class SequenceRunner(Protocol):
    """What :class:`~builder.runtime.scheduler.DecodeScheduler` drives: ``start`` prefills one prompt and
    returns its :class:`Sequence` with the logits of its first token; ``decode`` feeds each given
    sequence its last token in one batched step, appending to its cache, ``length += 1`` and fresh
    ``logits``. Any sequences may be decoded together, in any order and grouping from step to step."""

    def start(
        self,
        input_ids: np.ndarray,  # [S] int64
        multimodal_embeds: np.ndarray,  # [S, hidden] float32
        multimodal_mask: np.ndarray,  # [S] bool
        params: SamplingParams,
        stop_ids: frozenset[int] = ...,
        position_ids: np.ndarray | None = None,  # [3, S] when the decoder takes M-RoPE positions
    ) -> Sequence: ...

    def decode(self, sequences: list[Sequence]) -> None: ...

    def retire(self, sequence: Sequence) -> None:
        """The sequence finished: the runner may keep its cache for later prompts that start with it."""


class GenerateOne:
    """``generate`` for any :class:`SequenceRunner`: one request on its own, without the scheduler."""

    def generate(
        self: SequenceRunner,
        input_ids: np.ndarray,
        multimodal_embeds: np.ndarray,
        multimodal_mask: np.ndarray,
        params: SamplingParams,
        stop_ids: frozenset[int] = frozenset(),
        position_ids: np.ndarray | None = None,
    ) -> Iterator[int]:
        """Yields new token ids as they are chosen; stops on a stop id (not yielded) or after max_tokens."""
        seq = self.start(input_ids, multimodal_embeds, multimodal_mask, params, stop_ids, position_ids)
        while True:
            token = seq.next_token()
            if token is not None:
                yield token
            if seq.finished:
                self.retire(seq)
                return
            self.decode([seq])


class LanguageModelRunner(GenerateOne):
    """Drives the LLM graph: ``start`` prefills one prompt, ``decode`` advances any number of sequences.

    Two graph layouts, told apart by the graph's metadata (``contract.KV_LAYOUT_KEY``):

    - in place (ONNX Runtime's, ``builder.compile.ort_llm_graph``): every sequence's cache lives in one buffer
      per KV tensor (:class:`~.kv_slots.KvSlots`), bound to the graph as both past and present, so a step writes
      the new positions and copies nothing; the attention mask is right-padded (each row's own length).
    - appended (the exported graph, TensorRT's form): a step's present is past + new, returned as new tensors; the
      caches of sequences of different lengths are left-padded to the longest and masked, as HF does for a
      left-padded batch. A batch of one has no padding at all.

    ``max_context`` / ``max_batch``: the most positions and sequences the in-place cache will hold, allocated up
    front (pages are committed as they are written); without them it grows as needed.
    """

    def __init__(self, onnx_path: str, facts: ModelFacts, intra_op_threads: int = 0,
                 prefix_cache: PrefixCache | None = None, profile_prefix: str | None = None,
                 max_context: int | None = None, max_batch: int | None = None) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        if profile_prefix is not None:  # ONNX Runtime's profiler (the bench takes a decode step apart with it)
            options.enable_profiling, options.profile_file_prefix = True, profile_prefix
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        self.facts = facts
        kv = [i for i in self.session.get_inputs() if i.name.startswith(f"{PAST_PREFIX}.")]
        self.kv_inputs = [i.name for i in kv]
        # The cache is in the graph's weight dtype (FP16 for an FP16 build), every other tensor FP32.
        self.kv_dtype = np.float16 if kv and kv[0].type == "tensor(float16)" else np.float32
        self.prefix_cache = prefix_cache  # None: every prompt is prefilled whole
        self.kv_outputs = [o.name for o in self.session.get_outputs() if o.name.startswith(f"{PRESENT_PREFIX}.")]
        in_place = self.session.get_modelmeta().custom_metadata_map.get(KV_LAYOUT_KEY) == KV_IN_PLACE
        self.slots = (KvSlots(self.kv_inputs, facts.num_kv_heads, facts.head_dim, self.kv_dtype, max_batch or 1,
                              max_context or 256) if in_place else None)
        # Appended layout: the last decode step's sequences and its present KV: [B, kv_heads, longest, head_dim]
        # each, left-padded as the next step's past would be. Holds at most one batch's cache beyond its sequences'.
        self._last_batch: tuple[list[Sequence], dict[str, np.ndarray]] | None = None
        self._binding: tuple[tuple[int, int, int], ort.IOBinding] | None = None  # in place: the cache's, while it holds

    @property
    def in_place(self) -> bool:
        """The graph updates the cache in place (its metadata says so)."""
        return self.slots is not None

    def start(
        self,
        input_ids: np.ndarray,  # [S] int64
        multimodal_embeds: np.ndarray,  # [S, hidden] float32
        multimodal_mask: np.ndarray,  # [S] bool
        params: SamplingParams,
        stop_ids: frozenset[int] = frozenset(),
        position_ids: np.ndarray | None = None,  # [3, S] M-RoPE positions (position_rows 3); None: 0, 1, 2...
    ) -> Sequence:
        facts = self.facts
        length = int(input_ids.size)
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(length, dtype=np.int64), (facts.position_rows, length))
        key, hit = None, None
        if self.prefix_cache is not None:
            key = PrefixKey.of_prompt(input_ids, multimodal_embeds, multimodal_mask, position_ids)
            hit = self.prefix_cache.lookup(key)
        reused = hit.length if hit else 0  # positions whose KV comes from an earlier sequence
        feeds = {
            INPUT_IDS: input_ids[None, reused:].astype(np.int64),
            MULTIMODAL_EMBEDS: multimodal_embeds[None, reused:].astype(np.float32),
            MULTIMODAL_MASK: multimodal_mask[None, reused:].astype(bool),
            ATTENTION_MASK: np.ones((1, length), dtype=np.int64),
            POSITION_IDS: self._positions(np.ascontiguousarray(position_ids[:, None, reused:], dtype=np.int64)),
        }
        # The next position follows the prompt's largest (M-RoPE: an image spans fewer positions than tokens).
        offset = int(position_ids.max()) + 1 - length if length else 0
        seq = Sequence(params, stop_ids, np.random.default_rng(params.seed), None, length, np.empty(0),
                       position_offset=offset, prompt_key=key)
        if self.slots is not None:
            row = self.slots.claim(seq, length)
            if hit:
                self.slots.write(row, hit.past)
            logits = self._run_in_place(feeds, row, 1)
            self.slots.lengths[row] = length
        else:
            empty_kv = np.zeros((1, facts.num_kv_heads, 0, facts.head_dim), dtype=self.kv_dtype)
            past = [kv[None] for kv in hit.past] if hit else [empty_kv] * len(self.kv_inputs)
            logits, *present = self.session.run([LOGITS, *self.kv_outputs], {**feeds, **dict(zip(self.kv_inputs, past))})
            seq.past = [p[0] for p in present]
        seq.logits = logits[0]
        if key is not None:
            self.prefix_cache.store(key, self.cache_of(seq))
        return seq

    def cache_of(self, sequence: Sequence) -> list[np.ndarray]:
        """The sequence's cache, per KV tensor [kv_heads, length, head_dim] (in place: a copy out of its row)."""
        if self.slots is None:
            return sequence.past
        row = self.slots.row_of(sequence)
        assert row is not None, "a sequence holds its row until it is retired"
        return self.slots.read(row, sequence.length)

    def retire(self, sequence: Sequence) -> None:
        """Keeps the finished sequence's prompt + answer: a conversation's next turn starts with them. The cache holds
        every token fed so far (all of the answer but a last one that no step has fed: one that hit max_tokens).
        In place, its row is free after this (a sequence dropped without ``retire`` frees it when it is collected)."""
        key = sequence.prompt_key
        if key is not None:
            fed = sequence.tokens[:sequence.length - key.length]
            self.prefix_cache.store(key.extended(fed, key.length + sequence.position_offset), self.cache_of(sequence))
        if self.slots is not None:
            self.slots.release(sequence)

    def _positions(self, rows: np.ndarray) -> np.ndarray:
        """[rows, B, S] positions as the graph takes them: [B, S] for plain positions, [3, B, S] for M-RoPE."""
        return rows[0] if self.facts.position_rows == 1 else rows

    def decode(self, sequences: list[Sequence]) -> None:
        """Feeds each sequence its last token; updates its cache and next-token logits."""
        facts = self.facts
        batch, longest = len(sequences), max(s.length for s in sequences)
        feeds = {
            INPUT_IDS: np.array([[s.tokens[-1]] for s in sequences], dtype=np.int64),
            MULTIMODAL_EMBEDS: np.zeros((batch, 1, facts.hidden_size), dtype=np.float32),
            MULTIMODAL_MASK: np.zeros((batch, 1), dtype=bool),
            POSITION_IDS: self._positions(np.broadcast_to(
                np.array([[s.length + s.position_offset] for s in sequences], dtype=np.int64),
                (facts.position_rows, batch, 1)).copy()),
        }
        attention = np.zeros((batch, longest + 1), dtype=np.int64)
        if self.slots is not None:
            for row, seq in enumerate(sequences):
                attention[row, :seq.length + 1] = 1
            self.slots.reserve(longest + 1)
            self.slots.arrange(sequences)
            logits = self._run_in_place({**feeds, ATTENTION_MASK: attention}, 0, batch)
            for row, seq in enumerate(sequences):
                seq.length += 1
                seq.logits = logits[row]
                self.slots.lengths[row] = seq.length
            return
        for row, seq in enumerate(sequences):
            attention[row, longest - seq.length:] = 1
        feeds.update({ATTENTION_MASK: attention, **self._batched_past(sequences, longest)})
        logits, *present = self.session.run([LOGITS, *self.kv_outputs], feeds)
        self._last_batch = (list(sequences), dict(zip(self.kv_inputs, present)))
        for row, seq in enumerate(sequences):
            pad = longest - seq.length
            seq.past = [p[row, :, pad:] for p in present]
            seq.length += 1
            seq.logits = logits[row]

    def _run_in_place(self, feeds: dict[str, np.ndarray], first_row: int, rows: int) -> np.ndarray:
        """Runs the graph on ``feeds`` with every past and present bound to rows ``[first_row, first_row + rows)``
        of the cache's buffers; returns the logits (the presents are the buffers themselves). The binding of the
        cache is kept while those rows and buffers stay the same (every step of an unchanged batch): a step binds
        its few small inputs and a fresh logits array only."""
        assert self.slots is not None
        key = (first_row, rows, self.slots.generation)
        if self._binding is None or self._binding[0] != key:
            binding = self.session.io_binding()
            for name, view in self.slots.rows_view(first_row, rows).items():
                present = name.replace(f"{PAST_PREFIX}.", f"{PRESENT_PREFIX}.", 1)
                binding.bind_input(name, "cpu", 0, self.kv_dtype, list(view.shape), view.ctypes.data)
                binding.bind_output(present, "cpu", 0, self.kv_dtype, list(view.shape), view.ctypes.data)
            self._binding = (key, binding)
        binding = self._binding[1]
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        logits = np.empty((rows, self.facts.vocab_size), dtype=np.float32)
        binding.bind_output(LOGITS, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return logits

    def _batched_past(self, sequences: list[Sequence], longest: int) -> dict[str, np.ndarray]:
        """Each KV input as [B, kv_heads, longest, head_dim], every sequence's cache left-padded. The same batch as
        the last step's, in the same order, finds it already so in that step's present KV (no copy): the usual case
        between one arrival or departure and the next."""
        if self._last_batch is not None:
            last, present = self._last_batch
            if len(last) == len(sequences) and all(a is b for a, b in zip(last, sequences)):
                return present
        facts = self.facts
        past = {name: np.zeros((len(sequences), facts.num_kv_heads, longest, facts.head_dim), dtype=self.kv_dtype)
                for name in self.kv_inputs}
        for row, seq in enumerate(sequences):
            for name, cache in zip(self.kv_inputs, seq.past):
                past[name][row, :, longest - seq.length:] = cache
        return past
