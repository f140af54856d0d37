"""Teacher-forced agreement of two LLMs: fed the same prompt and the same fixed continuation, at each of the first
positions, does the candidate pick the token the reference picks, and how close are its logits?

Free-running token equality is not the measure: one early flip changes every token after it. The continuation is
fixed text (the calibration prompts' tokens), not the reference's own greedy tokens: then the reference scores a prompt in
one forward pass, which reads each of its layers once (a 24B checkpoint is read from disk layer by layer; decoding 32
tokens greedily would read it 32 times).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnxruntime as ort

from builder.compare import OutputFigures, figures
from builder.runtime.encoders import embed_request
from builder.runtime.generation import SamplingParams, SequenceRunner
from builder.runtime.model_facts import ModelFacts
from builder.runtime.preprocess import ModelInputs

POSITIONS = 32


@dataclass(frozen=True)
class FusedPrompt:
    input_ids: np.ndarray  # [S]
    embeds: np.ndarray  # [S, hidden]
    mask: np.ndarray  # [S]
    position_ids: np.ndarray | None = None  # [3, S] for an M-RoPE decoder


@dataclass(frozen=True)
class Agreement:
    prompts: int
    positions: int  # per prompt
    agreement: float  # share of positions where both picked the same next token
    logits: OutputFigures  # the candidate's logits vs the reference's, over all positions

    def summary(self) -> str:
        return (f"teacher-forced agreement {self.agreement:.1%} over {self.prompts} prompts x {self.positions} positions, "
                f"logits cos >= {self.logits.cosine:.5f}")


class LogitScorer(Protocol):
    """An LLM as the gates see it."""

    def score(self, prompt: FusedPrompt, continuation: np.ndarray) -> np.ndarray:
        """[len(continuation) + 1, vocab] FP32: the next token's logits after the prompt, then after each token of
        ``continuation`` fed in turn."""
        ...


class RunnerScorer:
    """A graph as serving runs it: the prompt prefilled, each continuation token one decode step."""

    def __init__(self, runner: SequenceRunner) -> None:
        self.runner = runner

    def score(self, prompt: FusedPrompt, continuation: np.ndarray) -> np.ndarray:
        sequence = self.runner.start(prompt.input_ids, prompt.embeds, prompt.mask,
                                     SamplingParams(max_tokens=len(continuation) + 1), position_ids=prompt.position_ids)
        rows = [sequence.logits.copy()]
        for token in continuation:
            sequence.tokens.append(int(token))
            self.runner.decode([sequence])
            rows.append(sequence.logits.copy())
        return np.stack(rows)


def fuse_prompt(inputs: ModelInputs, encoders: Mapping[str, ort.InferenceSession], facts: ModelFacts) -> FusedPrompt:
    """What the ensemble does before the LLM: encode the images and audio, place them at their tokens.
    ``encoders`` maps ``vision_encoder`` / ``audio_encoder`` to a session."""
    embeds, mask = embed_request(inputs, encoders, facts)
    return FusedPrompt(inputs.input_ids, embeds, mask, inputs.position_ids)


def score_all(scorer: LogitScorer, prompts: Sequence[FusedPrompt], continuations: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    return tuple(scorer.score(p, c) for p, c in zip(prompts, continuations, strict=True))


def agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> Agreement:
    """Each prompt's [positions, vocab] logits of the reference and of the candidate (:meth:`LogitScorer.score`)."""
    same = sum(int(np.sum(np.argmax(r, axis=-1) == np.argmax(c, axis=-1))) for r, c in zip(reference, candidate, strict=True))
    positions = reference[0].shape[0]
    (logits,) = figures([{"logits": row} for c in candidate for row in c], [{"logits": row} for r in reference for row in r],
                        ["logits"])
    return Agreement(len(reference), positions, same / (len(reference) * positions), logits)
