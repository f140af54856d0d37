"""A Gemma 3 checkpoint as Google publishes it builds, serves, and answers exactly as HF's own pipeline.

``Gemma3ForConditionalGeneration`` written by transformers (see ``tests/hf_gemma3.py``): images squashed to one
square, each ``<start_of_image>`` expanded in the text to 16 soft tokens between newlines, the soft tokens of an
image attending to each other both ways in the prefill, sliding-window layers whose window the prompts cross. The
reference is ``Gemma3Processor.apply_chat_template`` + ``generate``; served greedy ``output_ids`` must equal it for
text, one image, two images of different sizes and a system prompt; and an OpenAI client's conversation (images in
two turns, a system turn) through the front gets HF's text and prompt length.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.serve.client import Request, ask
from tests.conftest import wav_bytes
from tests.family_checks import (IMAGE_CONVERSATION, assert_image_conversation_as_reference, assert_next_turn_reuses_the_earlier_one,
                                 assert_int8_build_kept_its_promise,
                                 assert_refused, assert_served_as_reference, assert_streaming_equals_unary, family_fixtures)
from tests.hf_checkpoints import image, png
from tests.hf_gemma3 import gemma3_pipeline_generate, write_gemma3_checkpoint

NEW_TOKENS = 16
LIMITS = {"max_prompt_tokens": 256, "max_context": 320}
checkpoint, repository, connection = family_fixtures(write_gemma3_checkpoint, **LIMITS)

# (text, images as (seed, width, height), system prompt)
CASES = {
    "text": ("What is in the picture?", [], None),
    "one image": ("Describe the colours.", [(1, 90, 50)], None),
    "two images of different sizes": ("Compare the two pictures.", [(2, 40, 64), (3, 100, 100)], None),
    "a system prompt": ("Describe the colours.", [(4, 30, 80)], "Answer in one word."),
}

@pytest.fixture(scope="module")
def hf_pipeline(checkpoint: Path):
    import torch
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    return (Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval(),
            AutoProcessor.from_pretrained(checkpoint))


@pytest.fixture(scope="module")
def reference(hf_pipeline):
    model, processor = hf_pipeline
    return lambda text, images, system_prompt: gemma3_pipeline_generate(model, processor, text, images, NEW_TOKENS,
                                                                        system_prompt)


def test_only_the_components_the_checkpoint_has(repository: Path) -> None:
    models = {p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file()}
    assert models == {"preprocess", "vision_encoder", "fuse", "llm", "ensemble", "ensemble_stream"}
    assert set(json.loads((repository / "manifest.json").read_text())["components"]) == {"vision_encoder", "llm"}


@pytest.mark.serving
@pytest.mark.parametrize("case", CASES)
def test_served_greedy_tokens_equal_hugging_face_pipeline(case: str, connection, reference) -> None:
    text, images, system_prompt = CASES[case]
    pictures = [image(*spec) for spec in images]
    request = Request(text, images=tuple(png(p) for p in pictures), system_prompt=system_prompt, max_tokens=NEW_TOKENS)
    assert_served_as_reference(connection, request, reference(text, pictures, system_prompt))


@pytest.mark.serving
def test_what_an_image_holds_reaches_the_model(connection) -> None:
    answers = [ask(connection, Request("Describe the colours.", images=(png(image(seed, 90, 50)),),
                                       max_tokens=NEW_TOKENS)).token_ids for seed in (11, 12)]
    assert answers[0] != answers[1]


@pytest.mark.serving
def test_an_openai_client_conversation_equals_hugging_face_pipeline(connection, repository: Path, hf_pipeline) -> None:
    """Through the OpenAI front with the ``openai`` client: ``image_url`` parts in two turns, a system turn and an
    earlier answer give HF's text (decoded from its tokens) and HF's prompt length."""
    pictures = [image(5, 40, 28), image(6, 24, 48)]
    assert_image_conversation_as_reference(connection, repository, hf_pipeline, IMAGE_CONVERSATION, pictures, NEW_TOKENS)


@pytest.mark.serving
def test_a_next_turn_reuses_the_earlier_turns_kv_and_equals_hugging_face_pipeline(connection, hf_pipeline) -> None:
    """Turn 2 (turn 1 with its image, the served answer, a new question) prefills from the prefix cache past turn 1's
    prompt (the image reused whole: its tokens attend to each other both ways), and still gives HF's tokens. An answer
    whose random tokens begin with a space (the template trims it) or a byte token would be written back differently
    from its first token: this one begins with text."""
    first_turn = [{"role": "user", "content": [{"type": "image", "index": 0}, {"type": "text", "text": "Describe the colours."}]}]
    assert_next_turn_reuses_the_earlier_one(connection, hf_pipeline, first_turn, [image(6, 40, 28)], "And what colour is it?", NEW_TOKENS)


@pytest.mark.serving
def test_streaming_equals_unary(connection) -> None:
    assert_streaming_equals_unary(connection, Request("Compare the two pictures.", max_tokens=NEW_TOKENS,
                                                      images=(png(image(2, 40, 64)), png(image(3, 100, 100)))))


@pytest.mark.serving
def test_audio_to_a_vision_only_model_is_refused_by_name(connection) -> None:
    assert_refused(connection, Request("Transcribe.", audio=(wav_bytes(0.5),)), r"audio: this model has no audio encoder")


def test_int8_build_passes_the_pipeline_gate_or_falls_back_and_says_so(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert_int8_build_kept_its_promise(checkpoint, tmp_path / "repo", lambda: capsys.readouterr().out,
                                       ["text", "text+image"], **LIMITS)
