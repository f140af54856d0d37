"""The autoregressive loop over the exported LLM graph, with the KV cache kept between steps.

One ONNX graph serves prefill (the whole prompt, empty past) and decode (one token, growing past).
Sampling is greedy by default; temperature / top-k / top-p / seed follow the usual HF semantics.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from builder.runtime.errors import RequestError
from builder.runtime.model_facts import ModelFacts


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


class LanguageModelRunner:
    """Drives the LLM graph for one request at a time; the KV cache lives only during ``generate``."""

    def __init__(self, onnx_path: str, facts: ModelFacts, intra_op_threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        self.facts = facts
        self.kv_inputs = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.kv_outputs = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]

    def generate(
        self,
        input_ids: np.ndarray,  # [S] int64
        multimodal_embeds: np.ndarray,  # [S, hidden] float32
        multimodal_mask: np.ndarray,  # [S] bool
        params: SamplingParams,
        stop_ids: frozenset[int] = frozenset(),
    ) -> Iterator[int]:
        """Yields new token ids as they are chosen; stops on a stop id (not yielded) or max_tokens."""
        facts = self.facts
        rng = np.random.default_rng(params.seed)
        empty_kv = np.zeros((1, facts.num_kv_heads, 0, facts.head_dim), dtype=np.float32)
        past = {name: empty_kv for name in self.kv_inputs}
        feeds = {
            "input_ids": input_ids[None].astype(np.int64),
            "multimodal_embeds": multimodal_embeds[None].astype(np.float32),
            "multimodal_mask": multimodal_mask[None].astype(bool),
            "position_ids": np.arange(input_ids.size, dtype=np.int64)[None],
        }
        length = input_ids.size
        no_embeds = np.zeros((1, 1, facts.hidden_size), dtype=np.float32)
        for _ in range(params.max_tokens):
            feeds["attention_mask"] = np.ones((1, length), dtype=np.int64)
            logits, *present = self.session.run(["logits", *self.kv_outputs], {**feeds, **past})
            token = choose_token(logits[0], params, rng)
            if token in stop_ids:
                return
            yield token
            past = dict(zip(self.kv_inputs, present))
            feeds = {
                "input_ids": np.array([[token]], dtype=np.int64),
                "multimodal_embeds": no_embeds,
                "multimodal_mask": np.zeros((1, 1), dtype=bool),
                "position_ids": np.array([[length]], dtype=np.int64),
            }
            length += 1
