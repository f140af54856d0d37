"""Teacher-forced agreement of two LLM pipelines: at each of the first positions, fed the reference's
prefix, does the candidate pick the same next token, and how close are its logits?

Free-running token equality is not the measure: one early flip changes every token after it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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


def fuse_prompt(inputs: ModelInputs, encoders: Mapping[str, ort.InferenceSession], facts: ModelFacts) -> FusedPrompt:
    """What the ensemble does before the LLM: encode the images and audio, place them at their tokens.
    ``encoders`` maps ``vision_encoder`` / ``audio_encoder`` to a session."""
    embeds, mask = embed_request(inputs, encoders, facts)
    return FusedPrompt(inputs.input_ids, embeds, mask, inputs.position_ids)


def teacher_forced(
    reference: SequenceRunner, candidate: SequenceRunner,
    prompts: Sequence[tuple[FusedPrompt, FusedPrompt]], positions: int = POSITIONS,
) -> Agreement:
    """``prompts`` pairs each prompt as the reference pipeline fused it with the candidate's fusion
    (its own encoders); the LLMs then follow the reference's greedy tokens."""
    params = SamplingParams(max_tokens=positions)
    same, candidate_logits, reference_logits = 0, [], []
    for ref_prompt, cand_prompt in prompts:
        ref = reference.start(ref_prompt.input_ids, ref_prompt.embeds, ref_prompt.mask, params,
                              position_ids=ref_prompt.position_ids)
        cand = candidate.start(cand_prompt.input_ids, cand_prompt.embeds, cand_prompt.mask, params,
                               position_ids=cand_prompt.position_ids)
        for position in range(positions):
            token = int(np.argmax(ref.logits))
            same += int(np.argmax(cand.logits)) == token
            candidate_logits.append({"logits": cand.logits.copy()})
            reference_logits.append({"logits": ref.logits.copy()})
            if position + 1 < positions:
                ref.tokens.append(token)
                cand.tokens.append(token)
                reference.decode([ref])
                candidate.decode([cand])
    (logits,) = figures(candidate_logits, reference_logits, ["logits"])
    return Agreement(len(prompts), positions, same / (len(prompts) * positions), logits)
