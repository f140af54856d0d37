"""Request limits that follow the checkpoint where the spec leaves them unset (``make engines CHECKPOINT=dir``).

- ``max_context``: the decoder's own context (``max_position_embeddings``), at most :data:`CONTEXT_CAP`;
- ``max_prompt_tokens``: :data:`TEXT_ROOM` tokens of text beside ``max_images`` images of the largest size and
  ``max_audio_clips`` whole clips, each at the family's placeholder cost, leaving at least a quarter of the context
  for the answer;
- ``max_tokens``: the room the prompt leaves (``default_max_tokens`` at most that).

A key the spec (or ``--set``) gives is kept as given; the rest are derived around it.
"""

from __future__ import annotations

import dataclasses

from builder.runtime.media import image_layout
from builder.runtime.model_facts import AudioFacts, ImageFacts, ModelFacts
from builder.spec import BuildSpec, LimitsSpec, with_limits

# Tokens per sequence at most when the spec does not say. Each sequence may reserve this much KV cache
# (triton.kv_budget_tokens defaults to max_batch_size x max_context): 8192 positions of Magistral Small's
# 160 KiB are 1.25 GiB, which a 24-48 GB GPU holds for a batch beside INT8/INT4 weights.
CONTEXT_CAP = 8192
# Prompt tokens besides the media: the chat template, a system prompt (Magistral's SYSTEM_PROMPT.txt is ~600) and
# the question.
TEXT_ROOM = 1024


def checkpoint_limits(spec: BuildSpec, facts: ModelFacts) -> BuildSpec:
    """``spec`` with every unset limit derived from ``facts``, checked as a spec file's limits are."""
    given = spec.limits
    context = given.max_context or min(facts.max_positions or CONTEXT_CAP, CONTEXT_CAP)
    media = given.max_images * most_image_tokens(facts.image) + given.max_audio_clips * most_clip_tokens(facts.audio)
    prompt = given.max_prompt_tokens or min(TEXT_ROOM + media, context - context // 4)
    max_tokens = given.max_tokens or max(context - prompt, 1)
    default = given.default_max_tokens if given.max_tokens else min(given.default_max_tokens, max_tokens)
    return with_limits(spec, dataclasses.replace(given, max_context=context, max_prompt_tokens=prompt,
                                                 max_tokens=max_tokens, default_max_tokens=default))


def most_image_tokens(image: ImageFacts | None) -> int:
    """Placeholder tokens of the largest image the layout makes (0 without a vision encoder)."""
    return image_layout(image).most_tokens() if image is not None else 0


def most_clip_tokens(audio: AudioFacts | None) -> int:
    """Placeholder tokens of one whole clip sent as its own file (0 without an audio encoder)."""
    if audio is None:
        return 0
    return audio.tokens_per_clip + (audio.begin is not None)


def describe(limits: LimitsSpec, facts: ModelFacts) -> str:
    """One line for the build's output and report: the media named are those the model takes."""
    media = [f"{count} {what}" for count, what, has in ((limits.max_images, "images", facts.image),
                                                       (limits.max_audio_clips, "audio clips", facts.audio)) if has]
    return (f"limits: context {limits.max_context} tokens, prompt {limits.max_prompt_tokens}"
            + (f" ({', '.join(media)})" if media else "")
            + f", max_tokens {limits.max_tokens} (default {limits.default_max_tokens})")
