"""The shared-prefix KV cache: the same tokens with it and without it, the prefix computed once, bounded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from builder.compare import onnxruntime_session
from builder.quantize.agreement import fuse_prompt
from builder.runtime.generation import LanguageModelRunner, SamplingParams
from builder.runtime.model_facts import ModelFacts
from builder.runtime.prefix_cache import PrefixCache
from builder.runtime.preprocess import Preprocessor
from tests.conftest import png_bytes, wav_bytes

SYSTEM = "You are a careful assistant. Answer in one short sentence, and say when you are not sure."
REQUESTS = [  # (user text, images, audio): the same system prompt, then text, an image, audio
    ("What is in the picture?", [png_bytes(1, (80, 56))], []),
    ("Tell me a story about a fox.", [], []),
    ("Tell me a story about a dog.", [], []),
    ("What do you hear?", [], [wav_bytes(1.5)]),
    ("What is in the picture?", [png_bytes(2, (40, 96))], []),
]


@pytest.fixture(scope="module")
def graphs(built_repository: Path) -> dict[str, Path]:
    return {name: built_repository / name / "1" / "model.onnx" for name in ("vision_encoder", "audio_encoder", "llm")}


def answers(runner: LanguageModelRunner, prompts: list, facts: ModelFacts) -> list[list[int]]:
    return [list(runner.generate(p.input_ids, p.embeds, p.mask, SamplingParams(16), frozenset(facts.stop_ids))) for p in prompts]


def test_the_same_tokens_with_and_without_the_cache(graphs: dict[str, Path], preprocessor: Preprocessor) -> None:
    facts = preprocessor.facts
    encoders = {name: onnxruntime_session(path) for name, path in graphs.items() if name != "llm"}
    prompts = [fuse_prompt(preprocessor(text, images, audio, SYSTEM), encoders, facts) for text, images, audio in REQUESTS]
    cache = PrefixCache(64 << 20)
    cached = LanguageModelRunner(str(graphs["llm"]), facts, prefix_cache=cache)
    plain = LanguageModelRunner(str(graphs["llm"]), facts)
    assert answers(cached, prompts, facts) == answers(plain, prompts, facts)
    assert cache.lookups == len(REQUESTS) and cache.hits == len(REQUESTS) - 1  # all but the first reuse a prefix
    system_tokens = len(preprocessor.tokenizer.encode(SYSTEM, add_special_tokens=False).ids)
    hit = cache.lookup(prompts[2].input_ids, prompts[2].mask)
    assert hit is not None and hit.length > system_tokens  # "Tell me a story about a" too, from the fox


def test_the_cache_stops_at_the_first_placeholder_and_keeps_its_bound() -> None:
    kv = lambda n: [np.ones((2, n, 4), np.float32)] * 4  # noqa: E731 - 4 KV tensors of n positions
    cache = PrefixCache(capacity_bytes=3 * (4 * 2 * 10 * 4 * 4 + 10 * 8) - 1)  # room for two prompts of 10 text tokens
    ids = np.arange(20, dtype=np.int64)
    mask = np.zeros(20, bool)
    mask[10:] = True  # an image from position 10
    cache.store(ids, mask, kv(20))
    assert cache.lookup(ids, mask).length == 10  # text only: the image's embeddings are not in the ids
    for first in (100, 200):  # two more prompts: the oldest is evicted
        cache.store(np.arange(first, first + 10), np.zeros(10, bool), kv(10))
    assert cache.lookup(ids, mask) is None and cache.size_bytes <= cache.capacity_bytes
    assert cache.lookup(np.arange(200, 230), np.zeros(30, bool)).length == 10
    assert cache.lookup(np.arange(200, 210), np.zeros(10, bool)).length == 9  # one position left to run
