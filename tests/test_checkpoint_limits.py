"""Limits a spec leaves unset follow the checkpoint: its context, and prompt room for the configured media at the
family's token cost (builder/source/limits.py). Served proof: the Voxtral and Qwen2-Audio checkpoint tests build with
no spec options and serve two clips and a question."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.errors import SpecError
from builder.runtime.image import resized_size
from builder.runtime.model_facts import AudioFacts, ImageFacts, ModelFacts
from builder.source.checkpoint import read_facts
from builder.source.limits import CONTEXT_CAP, TEXT_ROOM, checkpoint_limits, most_clip_tokens, most_image_tokens
from builder.spec import load_spec
from tests.conftest import ROOT, run_cli
from tests.hf_checkpoints import write_mistral3_checkpoint

# Voxtral's audio (30 s windows of 375 tokens after [BEGIN_AUDIO]) and Pixtral's images (Mistral Small 3.x: 1540 px,
# 28 px cells) as their facts state them.
VOXTRAL_AUDIO = AudioFacts(token=24, begin=25, num_mel_bins=128, clip_samples=480_000, hop_length=160,
                           positions_per_token=4, layout="windows", token_text="[AUDIO]")
PIXTRAL_IMAGE = ImageFacts(token=10, row_break=12, end=13, patch_size=14, merge_size=2, longest_edge=1540,
                           mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), token_text="[IMG]")


def facts(max_positions: int, image: ImageFacts | None = None, audio: AudioFacts | None = None) -> ModelFacts:
    return ModelFacts("test", 1000, 64, 2, 2, 16, (2,), image, audio, max_positions=max_positions)


def unset(**overrides: object):
    """A spec as `make engines CHECKPOINT=dir` loads it (no file), with ``--set`` style overrides."""
    return load_spec(None, {"source.preset": None, "source.checkpoint": "/checkpoint", **overrides})


def test_audio_limits_hold_the_configured_clips_and_the_rest_is_the_answer() -> None:
    limits = checkpoint_limits(unset(), facts(32768, audio=VOXTRAL_AUDIO)).limits
    assert most_clip_tokens(VOXTRAL_AUDIO) == 376
    assert limits.max_context == min(32768, CONTEXT_CAP)
    assert limits.max_prompt_tokens == TEXT_ROOM + limits.max_audio_clips * 376
    assert limits.max_tokens == limits.max_context - limits.max_prompt_tokens and limits.default_max_tokens == 32


def test_the_context_is_the_checkpoints_when_it_is_shorter() -> None:
    limits = checkpoint_limits(unset(), facts(2048, audio=VOXTRAL_AUDIO)).limits
    assert limits.max_context == 2048
    assert limits.max_prompt_tokens == 2048 - 2048 // 4  # the media ask more: a quarter stays for the answer
    assert limits.max_tokens == 2048 // 4


def test_pixtral_images_at_their_largest_size() -> None:
    """Mistral Small 3.x: a 1540 px image is 55 rows of 55 [IMG] and a break: 3,080 tokens."""
    height, width = resized_size(1540, 1540, 1540, 28)
    assert (height, width) == (1540, 1540) and most_image_tokens(PIXTRAL_IMAGE) == 55 * 56
    limits = checkpoint_limits(unset(**{"limits.max_images": 1}), facts(131072, image=PIXTRAL_IMAGE)).limits
    assert limits.max_prompt_tokens == TEXT_ROOM + 3080


def test_a_spec_or_set_keeps_each_key_it_gives() -> None:
    given = checkpoint_limits(unset(**{"limits.max_context": 3000, "limits.max_tokens": 100}), facts(32768, audio=VOXTRAL_AUDIO))
    assert given.limits.max_context == 3000 and given.limits.max_tokens == 100
    assert given.limits.max_prompt_tokens == min(TEXT_ROOM + 4 * 376, 3000 - 750)
    tiny = load_spec(ROOT / "specs" / "tiny.yaml")
    assert checkpoint_limits(tiny, facts(32768, audio=VOXTRAL_AUDIO)).limits == tiny.limits  # every key given
    with pytest.raises(SpecError, match=r"limits.max_prompt_tokens \(4000\) must be smaller than limits.max_context"):
        checkpoint_limits(unset(**{"limits.max_prompt_tokens": 4000}), facts(2048))


def test_plan_shows_the_limits_a_checkpoint_build_serves_with(tmp_path: Path) -> None:
    checkpoint = write_mistral3_checkpoint(tmp_path / "checkpoint")
    expected = checkpoint_limits(unset(), read_facts(checkpoint)).limits
    result = run_cli("plan", str(checkpoint), "--gpu", "L4")
    assert result.returncode == 0, result.stderr
    assert (f"served limits: context {expected.max_context} tokens, prompt {expected.max_prompt_tokens} "
            f"(4 images), max_tokens {expected.max_tokens}") in result.stdout  # a vision-only model
    assert expected.max_context == 2048  # the checkpoint's max_position_embeddings
