"""What the served numbers are compared with, on the same requests and the same number of new tokens.

- in-process: the repository's own ONNX graphs, preprocessing and decode loop called directly,
  without a server, with `llm`'s prefix cache as configured (the floor for serving overhead);
- Hugging Face eager: the source checkpoint's ``generate`` in PyTorch (``builder.source.reference``),
  fed by the same preprocessing, one request at a time (what users run without this project).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from builder.bench.inputs import Case
from builder.repository.render import parse_config
from builder.runtime.contract import DECODE_MODEL
from builder.runtime.encoders import embed_request, encoder_session
from builder.runtime.generation import LanguageModelRunner, SamplingParams
from builder.runtime.prefix_cache import PrefixCache
from builder.runtime.preprocess import Preprocessor, RequestLimits
from builder.serve.client import Request
from builder.spec import LimitsSpec


@dataclass(frozen=True)
class Timed:
    latency_s: float
    ttft_s: float | None
    tokens: tuple[int, ...]


def load_preprocessor(repository: Path, limits: LimitsSpec) -> Preprocessor:
    """The ``preprocess`` model's work with the build's limits, from the repository's own files."""
    return Preprocessor.from_directory(repository / "preprocess" / "1", RequestLimits.from_spec(limits))


class InProcessPipeline:
    """preprocess -> encoders -> fuse -> decode loop, as the repository's models chain them, in this process."""

    def __init__(self, repository: Path, preprocessor: Preprocessor, max_tokens_cap: int) -> None:
        self.preprocess = preprocessor
        self.facts = preprocessor.facts
        self.max_tokens_cap = max_tokens_cap
        self.encoders = {
            name: encoder_session(str(path))
            for name in ("vision_encoder", "audio_encoder")
            if (path := repository / name / "1" / "model.onnx").is_file()
        }
        parameters = parse_config((repository / DECODE_MODEL / "config.pbtxt").read_text(), DECODE_MODEL).parameters
        cache_bytes = int(parameters["prefix_cache_bytes"].string_value) if "prefix_cache_bytes" in parameters else 0
        self.runner = LanguageModelRunner(str(repository / DECODE_MODEL / "1" / "model.onnx"), self.facts,
                                          prefix_cache=PrefixCache(cache_bytes) if cache_bytes else None)

    def __call__(self, request: Request) -> Iterator[int]:
        inputs = self.preprocess(request.prompt, list(request.images), list(request.audio), request.system_prompt)
        embeds, mask = embed_request(inputs, self.encoders, self.facts)
        params = SamplingParams(max_tokens=request.max_tokens or 0).validate(self.max_tokens_cap)
        yield from self.runner.generate(inputs.input_ids, embeds, mask, params, frozenset(self.facts.stop_ids),
                                        inputs.position_ids)


class HuggingFaceEager:
    """The source model's own greedy ``generate`` (the correctness oracle), on the same preprocessed tensors."""

    def __init__(self, checkpoint: Path, preprocessor: Preprocessor) -> None:
        from builder.source.checkpoint import load_checkpoint  # torch + transformers only here

        self.source = load_checkpoint(checkpoint)
        self.preprocess = preprocessor

    def __call__(self, request: Request) -> Iterator[int]:
        from builder.source.reference import reference_generate

        inputs = self.preprocess(request.prompt, list(request.images), list(request.audio), request.system_prompt)
        yield from reference_generate(self.source, inputs, max_new_tokens=request.max_tokens or 0)


def time_requests(generate: Callable[[Request], Iterable[int]], cases: tuple[Case, ...], passes: int,
                  streams: bool) -> list[Timed]:
    """Each case ``passes`` times in turn, after one untimed warm-up call per case; TTFT only if ``streams``."""
    for case in cases:
        list(generate(case.request))
    timed = []
    for _ in range(passes):
        for case in cases:
            start = time.perf_counter()
            first: float | None = None
            tokens = []
            for token in generate(case.request):
                if first is None:
                    first = time.perf_counter() - start
                tokens.append(token)
            timed.append(Timed(time.perf_counter() - start, first if streams else None, tuple(tokens)))
    return timed
