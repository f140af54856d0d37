"""A Voxtral checkpoint as Mistral publishes it builds, serves, and answers exactly as HF's own pipeline.

``VoxtralForConditionalGeneration`` written by transformers (odd sizes, BF16 shards), ``tekken.json`` as the only
tokenizer, no chat template: the reference is ``VoxtralProcessor.apply_chat_template`` (mistral-common decodes,
resamples and tokenizes the audio into 30 s windows) + ``generate``. Served greedy ``output_ids`` must equal it for
text, text with a system prompt, one clip, two clips, a clip over one window, and clips at 8 kHz and 44.1 kHz; and
an OpenAI client's conversation (clips in two turns; no system turn, which mistral-common refuses beside audio, as
the front does) through the front gets HF's text and prompt length.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from builder.runtime.model_facts import ModelFacts
from builder.serve.client import Request
from tests.conftest import png_bytes
from tests.family_checks import (assert_int8_build_kept_its_promise, assert_openai_chat_as_reference, assert_refused,
                                 assert_served_as_reference, assert_streaming_equals_unary, family_fixtures, noisy_wav,
                                 openai_chat)
from tests.hf_checkpoints import (base64_audio, hf_conversation, hf_conversation_generate, hf_conversation_inputs,
                                  voxtral_pipeline_generate, write_voxtral_checkpoint)
from tests.openai_front import openai_messages

NEW_TOKENS = 16
INT8_LIMITS = {"max_prompt_tokens": 1200, "max_context": 1280, "max_audio_clips": 3}  # the INT8 build: 30 s windows of 375 tokens
# Served as `make engines CHECKPOINT=dir` builds it: no spec file, the limits follow the checkpoint
checkpoint, repository, connection = family_fixtures(write_voxtral_checkpoint, template=None)

# (text, audio as (seed, seconds, sample rate), system prompt)
CASES = {
    "text": ("Tell me a story.", [], None),
    "text with a system prompt": ("Tell me a story.", [], "Answer in one word."),
    "one clip": ("What do you hear?", [(1, 1.5, 16000)], None),
    "two clips": ("Compare the two recordings.", [(2, 2.5, 16000), (3, 4.0, 16000)], None),
    "a clip over one 30 s window": ("Summarise it.", [(4, 31.0, 16000)], None),
    "a clip at 8 kHz": ("What do you hear?", [(5, 2.0, 8000)], None),
    "a clip at 44.1 kHz": ("What do you hear?", [(6, 2.0, 44100)], None),
}

# Clips in two turns and an earlier answer, as a chat client sends them (OpenAI's shape); no system turn, which
# mistral-common refuses beside audio (see the system prompt tests below)
CONVERSATION = [
    {"role": "user", "content": [{"type": "audio", "index": 0}, {"type": "text", "text": "What do you hear?"}]},
    {"role": "assistant", "content": "A tone under some noise."},
    {"role": "user", "content": [{"type": "text", "text": "And in this one?"}, {"type": "audio", "index": 1}]},
]


@pytest.fixture(scope="module")
def hf_pipeline(checkpoint: Path):
    pytest.importorskip("mistral_common")
    import torch
    from transformers import VoxtralForConditionalGeneration, VoxtralProcessor

    return (VoxtralForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval(),
            VoxtralProcessor.from_pretrained(checkpoint))


@pytest.fixture(scope="module")
def reference(hf_pipeline):
    model, processor = hf_pipeline
    return lambda text, audio, system_prompt: voxtral_pipeline_generate(model, processor, text, audio, NEW_TOKENS,
                                                                        system_prompt)


def test_only_the_components_the_checkpoint_has(repository: Path) -> None:
    models = {p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file()}
    assert models == {"preprocess", "audio_encoder", "fuse", "llm", "ensemble", "ensemble_stream"}
    assert set(json.loads((repository / "manifest.json").read_text())["components"]) == {"audio_encoder", "llm"}
    facts = ModelFacts.load(repository / "preprocess" / "1" / "model_facts.json")
    assert facts.family == "voxtral" and facts.audio is not None and facts.audio.tokens_per_clip == 375


@pytest.mark.serving
@pytest.mark.parametrize("case", CASES)
def test_served_greedy_tokens_equal_hugging_face_pipeline(case: str, connection, reference) -> None:
    text, audio, system_prompt = CASES[case]
    clips = [noisy_wav(*spec) for spec in audio]
    request = Request(text, audio=tuple(clips), system_prompt=system_prompt, max_tokens=NEW_TOKENS)
    assert_served_as_reference(connection, request, reference(text, clips, system_prompt))


@pytest.mark.serving
def test_streaming_equals_unary(connection) -> None:
    assert_streaming_equals_unary(connection, Request("Compare the two recordings.", audio=(noisy_wav(2, 2.5), noisy_wav(3, 4.0)),
                                                      max_tokens=NEW_TOKENS))


@pytest.mark.serving
def test_a_system_prompt_with_audio_is_refused_as_mistral_common_refuses_it(connection, reference) -> None:
    clip = noisy_wav(1, 1.5)
    with pytest.raises(ValueError, match="system messages .* audio"):
        reference("What do you hear?", [clip], "Answer in one word.")
    assert_refused(connection, Request("What do you hear?", audio=(clip,), system_prompt="Answer in one word."),
                   r"a system prompt cannot go with audio")


@pytest.mark.serving
def test_an_openai_client_conversation_equals_hugging_face_pipeline(connection, repository: Path, hf_pipeline) -> None:
    """Through the OpenAI front with the ``openai`` client: ``input_audio`` parts in two turns and an earlier answer
    give HF's text (decoded from its tokens) and HF's prompt length."""
    model, processor = hf_pipeline
    clips = [noisy_wav(21, 2.0), noisy_wav(22, 3.5, 8000)]
    conversation = hf_conversation(CONVERSATION, audio=base64_audio(clips))
    expected = hf_conversation_generate(model, processor, conversation, NEW_TOKENS)
    prompt_length = hf_conversation_inputs(processor, conversation)["input_ids"].shape[1]
    assert_openai_chat_as_reference(connection, repository, openai_messages(CONVERSATION, audio=clips), expected,
                                    processor.tokenizer.decode(expected, skip_special_tokens=True), prompt_length)


@pytest.mark.serving
def test_an_openai_client_conversation_with_a_system_turn_and_audio_is_refused_as_mistral_common_refuses_it(
    connection, repository: Path, hf_pipeline,
) -> None:
    processor = hf_pipeline[1]
    clips = [noisy_wav(21, 2.0), noisy_wav(22, 3.5, 8000)]
    with_system = [{"role": "system", "content": "Answer briefly."}, *CONVERSATION]
    with pytest.raises(ValueError, match="system messages .* audio"):
        hf_conversation_inputs(processor, hf_conversation(with_system, audio=base64_audio(clips)))
    with openai_chat(connection, repository) as (chat, name):
        with pytest.raises(openai.BadRequestError, match=r"a system prompt cannot go with audio") as raised:
            chat.chat.completions.create(model=name, messages=openai_messages(with_system, audio=clips), max_tokens=4)
        assert raised.value.status_code == 400


@pytest.mark.serving
def test_an_image_to_an_audio_only_model_is_refused_by_name(connection) -> None:
    assert_refused(connection, Request("Describe it.", images=(png_bytes(0),)), r"image: this model has no vision encoder")


def test_int8_build_passes_the_pipeline_gate_or_falls_back_and_says_so(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert_int8_build_kept_its_promise(checkpoint, tmp_path / "repo", lambda: capsys.readouterr().out,
                                       ["text", "text+audio"], **INT8_LIMITS)
