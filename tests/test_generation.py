"""The decode loop, sampling and continuous batching, on the built LLM graph (no server)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from builder.runtime.errors import RequestError
from builder.runtime.generation import LanguageModelRunner, SamplingParams, choose_token
from builder.runtime.model_facts import ModelFacts
from builder.runtime.scheduler import DecodeJob, DecodeScheduler
from builder.runtime.text import TextStream, load_tokenizer


@pytest.fixture(scope="module")
def runner(built_repository) -> LanguageModelRunner:
    directory = built_repository / "llm" / "1"
    return LanguageModelRunner(str(directory / "model.onnx"), ModelFacts.load(directory / "model_facts.json"))


def text_inputs(ids: np.ndarray, hidden: int):
    return ids.astype(np.int64), np.zeros((ids.size, hidden), np.float32), np.zeros(ids.size, bool)


def prompts(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.integers(16, 272, size) for size in (5, 31, 12, 60, 2, 19)[:count]]


def test_greedy_matches_pytorch_and_stops_on_a_stop_id(runner, source_model):
    from builder.runtime.preprocess import ModelInputs
    from builder.source.reference import reference_generate

    ids = prompts(1)[0]
    tokens = list(runner.generate(*text_inputs(ids, runner.facts.hidden_size), SamplingParams(12)))
    no_media = ModelInputs(ids, np.zeros((0, 3, 1, 1), np.float32), np.zeros((0, 2), np.int64), np.zeros((0, 1, 1), np.float32),
                           np.zeros(0, np.int64))
    assert tokens == reference_generate(source_model, no_media, max_new_tokens=12)
    stopped = list(runner.generate(*text_inputs(ids, runner.facts.hidden_size), SamplingParams(12), frozenset({tokens[3]})))
    assert stopped == tokens[: tokens.index(tokens[3])]


def test_batched_decode_equals_one_at_a_time(runner):
    """Sequences of different lengths decode together (left-padded and masked) while others leave (shorter
    max_tokens) and join (two start after three steps): each step's batch is re-padded or reused as it stands."""
    hidden = runner.facts.hidden_size
    params = [SamplingParams(6 + 2 * i) for i in range(6)]
    alone = [list(runner.generate(*text_inputs(p, hidden), q)) for p, q in zip(prompts(6), params)]
    sequences = [runner.start(*text_inputs(p, hidden), q) for p, q in zip(prompts(6), params)]
    together: list[list[int]] = [[] for _ in sequences]
    step = 0
    while not all(s.finished for s in sequences):
        joined = sequences if step >= 3 else sequences[2:]
        for out, seq in zip(together, sequences):
            if seq in joined and not seq.finished:
                out.append(seq.next_token())
        active = [s for s in joined if not s.finished]
        if active:
            runner.decode(active)
        step += 1
    assert together == alone


def test_scheduler_batches_concurrent_jobs(runner):
    hidden = runner.facts.hidden_size
    batch_sizes: list[int] = []
    decode = runner.decode

    submitted = threading.Event()

    class CountingRunner:  # the real runner, recording how many sequences each step carried
        facts = runner.facts
        retire = runner.retire

        def start(self, *args):
            # the first prefill waits for every job to be queued: all six are then admitted before the second step,
            # however the machine's load spaces out this thread's submissions
            assert submitted.wait(30)
            return runner.start(*args)

        def decode(self, sequences):
            batch_sizes.append(len(sequences))
            decode(sequences)

    scheduler = DecodeScheduler(CountingRunner(), max_batch=4)
    results: dict[int, list[int]] = {i: [] for i in range(6)}
    done = threading.Semaphore(0)
    for i, p in enumerate(prompts(6)):
        scheduler.submit(DecodeJob(*text_inputs(p, hidden), SamplingParams(10), frozenset(), on_token=results[i].append,
                                   on_finish=done.release, on_error=lambda exc: pytest.fail(str(exc))))
    submitted.set()
    for _ in range(6):
        assert done.acquire(timeout=60)
    scheduler.close()
    assert max(batch_sizes) == 4  # never above max_batch, and more than one at a time
    assert [results[i] for i in range(6)] == [list(runner.generate(*text_inputs(p, hidden), SamplingParams(10))) for p in prompts(6)]


def test_sampling_filters():
    logits = np.array([0.0, 5.0, 4.9, -3.0, 1.0])
    rng = np.random.default_rng(0)
    assert choose_token(logits, SamplingParams(1), rng) == 1
    top2 = {choose_token(logits, SamplingParams(1, temperature=5.0, top_k=2), rng) for _ in range(200)}
    assert top2 == {1, 2}
    nucleus = {choose_token(logits, SamplingParams(1, temperature=1.0, top_p=0.5), rng) for _ in range(200)}
    assert nucleus == {1}
    spread = {choose_token(logits, SamplingParams(1, temperature=100.0), rng) for _ in range(500)}
    assert spread == {0, 1, 2, 3, 4}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(0), "max_tokens: 0 is outside 1..64"),
        (SamplingParams(65), "max_tokens: 65 is outside"),
        (SamplingParams(1, temperature=float("nan")), "temperature: nan must be a finite number"),
        (SamplingParams(1, temperature=-1.0), "temperature: -1.0"),
        (SamplingParams(1, top_k=-2), "top_k: -2"),
        (SamplingParams(1, top_p=0.0), r"top_p: 0.0 must be in \(0, 1\]"),
        (SamplingParams(1, top_p=1.5), "top_p: 1.5"),
    ],
)
def test_invalid_sampling_params(params, message):
    with pytest.raises(RequestError, match=message):
        params.validate(64)


def test_text_stream_holds_back_partial_characters(built_repository):
    tokenizer = load_tokenizer(str(built_repository / "llm" / "1" / "tokenizer.json"))
    ids = tokenizer.encode("naïve café 東京 ok", add_special_tokens=False).ids
    stream = TextStream(tokenizer)
    deltas = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(deltas) == "naïve café 東京 ok"
    assert all("\ufffd" not in d for d in deltas)


def test_text_stream_holds_back_a_byte_fallback_run_until_it_ends():
    """Gemma's decoder turns a run of byte tokens that is not valid UTF-8 into one U+FFFD per byte, so a later byte
    changes bytes already valid alone (``<0x1B>`` is "\\x1b", ``<0x1B><0xFF>`` "��": the tiny Gemma 3 answered so),
    across a special token too (skipped before decoding)."""
    from tests.hf_gemma3 import gemma_tokenizer

    tokenizer = gemma_tokenizer().backend_tokenizer
    word = tokenizer.encode("Hello", add_special_tokens=False).ids
    byte = {value: tokenizer.token_to_id(f"<0x{value:02X}>") for value in (0x1B, 0xFF, 0x41, 0xCB, 0xE6, 0x9D, 0xB1)}
    ids = [*word, byte[0x1B], byte[0xFF], *word, byte[0x41], tokenizer.token_to_id("<end_of_turn>"), byte[0xCB], *word,
           byte[0xE6], byte[0x9D], byte[0xB1]]
    stream = TextStream(tokenizer)
    deltas = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == "Hello��Hello��Hello東"
