"""A Qwen2-Audio checkpoint as Qwen publishes it builds, serves, and answers exactly as HF's own pipeline.

``Qwen2AudioForConditionalGeneration`` written by transformers (odd sizes, BF16 shards), ``tokenizer.json``, the
published chat template (a default system prompt, audio found by its block's "audio" key), a WhisperFeatureExtractor.
The reference is the model card's pipeline: ``apply_chat_template`` + the processor on audio loaded at 16 kHz as
librosa loads it + ``generate``. Each clip's ``<|AUDIO|>`` count follows its own length and the encoder masks its
padding: served greedy ``output_ids`` must equal HF's for text, one clip, two clips of different lengths, a whole
window, clips at 8 kHz and 44.1 kHz and a system prompt override.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.serve.client import Request, ask
from tests.conftest import png_bytes
from tests.family_checks import (assert_int8_build_kept_its_promise, assert_openai_chat_as_reference, assert_refused,
                                 assert_served_as_reference, assert_streaming_equals_unary, family_fixtures, noisy_wav)
from tests.hf_checkpoints import (hf_conversation, qwen2_audio_pipeline_generate, template_then_processor_generate,
                                  template_then_processor_inputs, write_qwen2_audio_checkpoint)
from tests.openai_front import openai_messages

NEW_TOKENS = 16
INT8_LIMITS = {"max_prompt_tokens": 1600, "max_context": 1700, "max_audio_clips": 2}  # the INT8 build: two clips of up to 750
# Served as `make engines CHECKPOINT=dir` builds it: no spec file, the limits follow the checkpoint
checkpoint, repository, connection = family_fixtures(write_qwen2_audio_checkpoint, template=None)

# (text, audio as (seed, seconds, sample rate), system prompt)
CASES = {
    "text": ("Tell me a story.", [], None),
    "one clip": ("What do you hear?", [(1, 1.5, 16000)], None),
    "two clips of different lengths": ("Compare the two recordings.", [(2, 2.5, 16000), (3, 7.3, 16000)], None),
    "a whole 30 s window": ("Summarise it.", [(4, 30.0, 16000)], None),
    "a clip at 8 kHz": ("What do you hear?", [(5, 2.0, 8000)], None),
    "a clip at 44.1 kHz": ("What do you hear?", [(6, 2.0, 44100)], None),
    "system prompt override": ("What do you hear?", [(7, 3.0, 16000)], "Answer in one word."),
}


# Clips in two turns, an earlier answer and a system turn, as a contract client sends them in `messages`.
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "audio", "index": 0}, {"type": "text", "text": "What do you hear?"}]},
    {"role": "assistant", "content": "A tone under some noise."},
    {"role": "user", "content": [{"type": "text", "text": "And in this one?"}, {"type": "audio", "index": 1}]},
]


@pytest.fixture(scope="module")
def hf_pipeline(checkpoint: Path):
    import torch
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    return (Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval(),
            AutoProcessor.from_pretrained(checkpoint))


@pytest.fixture(scope="module")
def reference(hf_pipeline):
    model, processor = hf_pipeline
    return lambda text, audio, system_prompt: qwen2_audio_pipeline_generate(model, processor, text, audio, NEW_TOKENS,
                                                                            system_prompt)


def test_only_the_components_the_checkpoint_has(repository: Path) -> None:
    models = {p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file()}
    assert models == {"preprocess", "audio_encoder", "fuse", "llm", "ensemble", "ensemble_stream"}
    assert set(json.loads((repository / "manifest.json").read_text())["components"]) == {"audio_encoder", "llm"}


@pytest.mark.serving
@pytest.mark.parametrize("case", CASES)
def test_served_greedy_tokens_equal_hugging_face_pipeline(case: str, connection, reference) -> None:
    text, audio, system_prompt = CASES[case]
    clips = [noisy_wav(*spec) for spec in audio]
    request = Request(text, audio=tuple(clips), system_prompt=system_prompt, max_tokens=NEW_TOKENS)
    assert_served_as_reference(connection, request, reference(text, clips, system_prompt))


@pytest.mark.serving
def test_what_a_clip_holds_reaches_the_model(connection) -> None:
    """Guards the cases above: two clips of the same length but other sounds give other answers."""
    answers = [ask(connection, Request("What do you hear?", audio=(noisy_wav(seed, 2.0),), max_tokens=NEW_TOKENS)).token_ids
               for seed in (11, 12)]
    assert answers[0] != answers[1]


@pytest.mark.serving
def test_an_openai_client_conversation_equals_hugging_face_pipeline(connection, repository: Path, hf_pipeline) -> None:
    """Through the OpenAI front with the ``openai`` client: ``input_audio`` parts in two turns, a system turn and an
    earlier answer give HF's text (decoded from its tokens) and HF's prompt length."""
    model, processor = hf_pipeline
    clips = [noisy_wav(21, 2.0), noisy_wav(22, 3.5, 8000)]
    conversation = hf_conversation(CONVERSATION, audio_url=[f"clip{i}.wav" for i in range(len(clips))])
    expected = template_then_processor_generate(model, processor, conversation, NEW_TOKENS, audio=clips)
    prompt_length = template_then_processor_inputs(processor, conversation, audio=clips)["input_ids"].shape[1]
    assert_openai_chat_as_reference(connection, repository, openai_messages(CONVERSATION, audio=clips), expected,
                                    processor.tokenizer.decode(expected, skip_special_tokens=True), prompt_length)


@pytest.mark.serving
def test_streaming_equals_unary(connection) -> None:
    assert_streaming_equals_unary(connection, Request("Compare the two recordings.", audio=(noisy_wav(2, 2.5), noisy_wav(3, 7.3)),
                                                      max_tokens=NEW_TOKENS))


@pytest.mark.serving
@pytest.mark.parametrize(("audio", "message"), [
    ((31.0, 16000), r"audio\[0\]: 31\.00 s is longer than this model's 30 s window"),
    ((0.01, 16000), r"audio\[0\]: 10 ms is too short to give this model one audio token"),
])
def test_audio_the_model_cannot_take_whole_is_refused(connection, audio, message: str) -> None:
    """Its processor would cut audio past 30 s without a word; serving says so instead."""
    assert_refused(connection, Request("What do you hear?", audio=(noisy_wav(8, *audio),)), message)


@pytest.mark.serving
def test_an_image_to_an_audio_only_model_is_refused_by_name(connection) -> None:
    assert_refused(connection, Request("Describe it.", images=(png_bytes(0),)), r"image: this model has no vision encoder")


def test_int8_build_passes_the_pipeline_gate_or_falls_back_and_says_so(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert_int8_build_kept_its_promise(checkpoint, tmp_path / "repo", lambda: capsys.readouterr().out,
                                       ["text", "text+audio"], **INT8_LIMITS)
