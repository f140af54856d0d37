"""The prefix KV cache: the same tokens with it and without it, a prefix computed once, a conversation's earlier turn
(its image and answer included) reused by the next, different media never, bounded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from builder.compare import onnxruntime_session
from builder.quantize.agreement import fuse_prompt
from builder.runtime.generation import LanguageModelRunner, SamplingParams
from builder.runtime.model_facts import ModelFacts
from builder.runtime.prefix_cache import PrefixCache, PrefixKey
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
    hit = cache.lookup(key(prompts[2]))
    assert hit is not None and hit.length > system_tokens  # "Tell me a story about a" too, from the fox


def key(prompt) -> PrefixKey:
    positions = prompt.position_ids if prompt.position_ids is not None else np.arange(prompt.input_ids.size)[None]
    return PrefixKey.of_prompt(prompt.input_ids, prompt.embeds, prompt.mask, positions)


def test_a_next_turn_reuses_the_earlier_turn_its_image_and_answer_included(graphs: dict[str, Path], preprocessor: Preprocessor) -> None:
    """Turn 2 = turn 1's prompt + its answer's ids + more: reused up to the last answer token fed, and the same tokens
    as without the cache. (Whether a chat template writes an answer back as the same ids is the served test's: the
    tiny model's random answers are bytes that do not decode to text.)"""
    facts = preprocessor.facts
    encoders = {name: onnxruntime_session(path) for name, path in graphs.items() if name != "llm"}
    cache = PrefixCache(64 << 20)
    cached = LanguageModelRunner(str(graphs["llm"]), facts, prefix_cache=cache)
    plain = LanguageModelRunner(str(graphs["llm"]), facts)
    more = np.array(preprocessor.tokenizer.encode("[INST]And what colour is it?[/INST]", add_special_tokens=False).ids)

    def turns(picture: bytes, answer: list[int] | None = None) -> tuple[list[int], int, np.ndarray]:
        """The answer to turn 1 (``answer`` None) or to turn 1 + ``answer`` + more, the same without the cache; the
        positions reused; the prompt's placeholder mask."""
        prompt = fuse_prompt(preprocessor("What is in the picture?", [picture], [], SYSTEM), encoders, facts)
        ids, embeds, mask = prompt.input_ids, prompt.embeds, prompt.mask
        if answer is not None:
            added = np.concatenate([answer, more]).astype(np.int64)
            ids, mask = np.concatenate([ids, added]), np.concatenate([mask, np.zeros(added.size, bool)])
            embeds = np.concatenate([embeds, np.zeros((added.size, embeds.shape[1]), embeds.dtype)])
        reused = cache.reused_tokens
        tokens = list(cached.generate(ids, embeds, mask, SamplingParams(16), frozenset(facts.stop_ids)))
        assert tokens == list(plain.generate(ids, embeds, mask, SamplingParams(16), frozenset(facts.stop_ids)))
        return tokens, cache.reused_tokens - reused, prompt.mask

    answer, _, first = turns(png_bytes(1, (80, 56)))
    assert len(answer) == 16  # cut at max_tokens: the cache holds all of it but the last token, which no step fed
    _, reused, _ = turns(png_bytes(1, (80, 56)), answer)
    assert reused == first.size + len(answer) - 1, (reused, first.size)
    _, reused, _ = turns(png_bytes(2, (80, 56)), answer)  # another picture in turn 1
    assert reused == np.flatnonzero(first)[0]  # only the text before it


def test_media_runs_match_by_their_embeddings_and_whole_positions_too() -> None:
    kv = lambda n: [np.arange(2 * n * 4, dtype=np.float32).reshape(2, n, 4)] * 4  # noqa: E731 - 4 KV tensors
    ids = np.arange(20, dtype=np.int64)
    mask = np.zeros(20, bool)
    mask[5:15] = True  # an image at positions 5..14
    picture = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    other = picture.copy()
    other[9] += 1  # another picture: one of its tokens differs
    plain = np.arange(20)[None]

    cache = PrefixCache(1 << 20)
    cache.store(PrefixKey.of_prompt(ids, picture, mask, plain), kv(20))
    assert cache.lookup(PrefixKey.of_prompt(ids, picture, mask, plain)).length == 19  # one position left to run
    assert cache.lookup(PrefixKey.of_prompt(ids, other, mask, plain)).length == 5  # the text before the image
    assert cache.lookup(PrefixKey.of_prompt(ids, picture, mask, plain + 1)) is None  # other positions, other KV
    assert cache.lookup(PrefixKey.of_prompt(ids[:12], picture[:12], mask[:12], plain[:, :12])).length == 5  # never part of an image

    longer = PrefixKey.of_prompt(ids, picture, mask, plain).extended([7, 8, 9], 20)  # the answer after it
    assert longer.length == 23 and list(longer.positions[0, -3:]) == [20, 21, 22]
    cache.store(longer, kv(23))
    assert cache.size_bytes < 2 * 23 * 4 * 4 * 4 * 2  # the prompt alone is dropped: the answer extends it
    follow_up = PrefixKey.of_prompt(np.concatenate([ids, [7, 8, 9, 1, 2]]), np.concatenate([picture, picture[:5]]),
                                    np.concatenate([mask, np.zeros(5, bool)]), np.arange(25)[None])
    assert cache.lookup(follow_up).length == 23


def test_the_cache_keeps_its_bound() -> None:
    kv = lambda n: [np.ones((2, n, 4), np.float32)] * 4  # noqa: E731 - 4 KV tensors of n positions
    text = lambda first: PrefixKey.of_prompt(np.arange(first, first + 10), np.zeros((10, 8), np.float32),  # noqa: E731
                                             np.zeros(10, bool), np.arange(10)[None])
    one = 4 * 2 * 10 * 4 * 4 + 10 * (8 + 8 + 1)  # KV + tokens, positions and media flags of 10 positions
    cache = PrefixCache(capacity_bytes=3 * one - 1)  # room for two
    for first in (0, 100, 200):  # three prompts: the oldest is evicted
        cache.store(text(first), kv(10))
    assert cache.lookup(text(0)) is None and cache.size_bytes <= cache.capacity_bytes
    assert cache.lookup(text(200)).length == 9 and cache.lookup(text(100)).length == 9
