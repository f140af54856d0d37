"""A conversation's second turn, time to first token with and without the prefix cache's earlier turn.

Turn 1 is a system prompt, a 224 px image and a question, answered (64 tokens) by the server's own
``LanguageModelRunner`` with a prefix cache, which keeps the finished sequence. Turn 2 is turn 1's prompt, its
answer's ids and a new question; its TTFT (``start()``: the prefill and the first token's logits) is timed with that
cache and without one, alternating which goes first, a new cache each round. Turn 2 takes the answer's ids as
generated: random weights answer in bytes that do not decode to text, so a chat template would write a different
answer back (with a real model's answers it writes the same ids, see README "Shared-prefix KV cache").

    python benchmarks/multi_turn_cache.py --repository /tmp/small --spec specs/small.yaml   # a built repository
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from builder.bench.baselines import load_preprocessor
from builder.bench.report import machine
from builder.compare import onnxruntime_session
from builder.quantize.agreement import fuse_prompt
from builder.runtime.generation import LanguageModelRunner, SamplingParams
from builder.runtime.prefix_cache import PrefixCache
from builder.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def picture(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--spec", type=Path, default=ROOT / "specs" / "tiny.yaml", help="the spec it was built from")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    preprocessor = load_preprocessor(args.repository, load_spec(args.spec).limits)
    facts, graph = preprocessor.facts, str(args.repository / "llm" / "1" / "model.onnx")
    encoders = {name: onnxruntime_session(args.repository / name / "1" / "model.onnx")
                for name in ("vision_encoder", "audio_encoder") if (args.repository / name).is_dir()}
    plain = LanguageModelRunner(graph, facts)
    question = np.array(preprocessor.tokenizer.encode("[INST]And what colour is the car in it, exactly?[/INST]",
                                                      add_special_tokens=False).ids)
    stop = frozenset(facts.stop_ids)
    timings: dict[str, list[float]] = {"with": [], "without": []}
    for round_ in range(args.rounds):
        first = fuse_prompt(preprocessor(f"What is in picture number {round_}?", [picture(round_)], [], "Answer briefly."),
                            encoders, facts)
        cache = PrefixCache(256 << 20)
        cached = LanguageModelRunner(graph, facts, prefix_cache=cache)
        answer = list(cached.generate(first.input_ids, first.embeds, first.mask, SamplingParams(64), stop))
        added = np.concatenate([answer, question]).astype(np.int64)
        ids = np.concatenate([first.input_ids, added])
        mask = np.concatenate([first.mask, np.zeros(added.size, bool)])
        embeds = np.concatenate([first.embeds, np.zeros((added.size, first.embeds.shape[1]), np.float32)])
        order = [("with", cached), ("without", plain)]
        for name, runner in order if round_ % 2 == 0 else order[::-1]:
            reused = cache.reused_tokens
            started = time.perf_counter()
            runner.start(ids, embeds, mask, SamplingParams(1), stop)
            timings[name].append(time.perf_counter() - started)
            if runner is cached:
                print(f"round {round_}: turn 1 {first.input_ids.size} prompt tokens + {len(answer)} answered; "
                      f"turn 2 {ids.size} tokens, {cache.reused_tokens - reused} reused")
    with_cache, without = (statistics.median(timings[k]) * 1000 for k in ("with", "without"))
    print(f"turn-2 TTFT median of {args.rounds}: {with_cache:.0f} ms with the earlier turn cached, {without:.0f} ms "
          f"without ({without / with_cache:.1f}x); {machine()}")


if __name__ == "__main__":
    main()
