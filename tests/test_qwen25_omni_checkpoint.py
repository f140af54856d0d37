"""A Qwen2.5-Omni thinker checkpoint as published (thinker only) builds, serves, and answers exactly as HF's pipeline.

``Qwen2_5OmniThinkerForConditionalGeneration`` written by transformers (odd sizes, BF16 shards, the on-disk key
layout), a Qwen2 tokenizer, the published chat template and preprocessor_config.json (tests/hf_qwen25_omni.py). The
reference is ``Qwen2_5OmniProcessor`` + ``generate``: served greedy ``output_ids`` must equal HF's for text, one
image, one clip, and an image with a clip, where the decoder's M-RoPE positions follow the image's grid; and an
OpenAI client's conversation (an image in one turn, a clip in another, a system turn) through the front gets HF's
text and prompt length.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from builder.serve.client import Request, ask
from tests.family_checks import (assert_int8_build_kept_its_promise, assert_openai_chat_as_reference, assert_refused,
                                 assert_served_as_reference, assert_streaming_equals_unary, family_fixtures, noisy_wav)
from tests.hf_checkpoints import (hf_conversation, image, png, template_then_processor_generate,
                                  template_then_processor_inputs)
from tests.hf_qwen25_omni import load_processor, omni_pipeline_generate, write_qwen25_omni_checkpoint
from tests.openai_front import openai_messages

NEW_TOKENS = 16
LIMITS = {"max_prompt_tokens": 1200, "max_context": 1300}
checkpoint, repository, connection = family_fixtures(write_qwen25_omni_checkpoint, **LIMITS)

# (text, images as (seed, width, height), audio as (seed, seconds, sample rate), system prompt)
CASES = {
    "text": ("Describe the colours and the shapes you see.", [], [], None),
    "one image": ("What is in the picture?", [(1, 97, 61)], [], None),
    "one clip": ("Listen to this audio clip and tell me what you hear.", [], [(2, 2.37, 16000)], None),
    "an image and a clip": ("Compare the audio with the image.", [(9, 130, 75)], [(10, 3.2, 16000)], None),
    "two images, a clip at 44.1 kHz, a system prompt": ("Compare them.", [(5, 300, 200), (6, 40, 50)],
                                                        [(7, 2.5, 44100)], "Answer in one word."),
}

# A conversation as a chat client sends it (OpenAI's shape): a system turn, an image in one user turn and a clip in
# another, an earlier answer
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "image", "index": 0}, {"type": "text", "text": "What is in the picture?"}]},
    {"role": "assistant", "content": "The quick brown fox near the river."},
    {"role": "user", "content": [{"type": "text", "text": "And what do you hear?"}, {"type": "audio", "index": 0}]},
]


@pytest.fixture(scope="module")
def hf_pipeline(checkpoint: Path):
    import torch
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    return (Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval(),
            load_processor(checkpoint))


@pytest.fixture(scope="module")
def reference(hf_pipeline):
    model, processor = hf_pipeline
    return lambda text, images, audio, system_prompt: omni_pipeline_generate(model, processor, text, images, audio,
                                                                             NEW_TOKENS, system_prompt)


def test_only_the_components_the_checkpoint_has(repository: Path) -> None:
    models = {p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file()}
    assert models == {"preprocess", "vision_encoder", "audio_encoder", "fuse", "llm", "ensemble",
                      "ensemble_stream"}
    assert json.loads((repository / "llm" / "1" / "model_facts.json").read_text())["position_rows"] == 3  # M-RoPE


@pytest.mark.serving
@pytest.mark.parametrize("case", CASES)
def test_served_greedy_tokens_equal_hugging_face_pipeline(case: str, connection, reference) -> None:
    text, images, audio, system_prompt = CASES[case]
    pictures, clips = [image(*spec) for spec in images], [noisy_wav(*spec) for spec in audio]
    request = Request(text, images=tuple(map(png, pictures)), audio=tuple(clips), system_prompt=system_prompt,
                      max_tokens=NEW_TOKENS)
    assert_served_as_reference(connection, request, reference(text, pictures, clips, system_prompt))


@pytest.mark.serving
def test_what_an_image_holds_reaches_the_model(connection) -> None:
    """Guards the cases above: two images of the same size but other pixels give other answers."""
    answers = [ask(connection, Request("What is in the picture?", images=(png(image(seed, 97, 61)),),
                                       max_tokens=NEW_TOKENS)).token_ids for seed in (11, 12)]
    assert answers[0] != answers[1]


@pytest.mark.serving
def test_concurrent_requests_decode_together_and_keep_their_own_positions(connection) -> None:
    """Requests whose images shift their M-RoPE positions by different amounts (or not at all) share decode steps and
    encoder runs (clips of other lengths, images of other sizes): each gets the answer it gets alone."""
    requests = [Request(text, images=tuple(png(image(*spec)) for spec in images), audio=tuple(noisy_wav(*spec) for spec in audio),
                        system_prompt=system_prompt, max_tokens=NEW_TOKENS) for text, images, audio, system_prompt in CASES.values()]
    alone = [ask(connection, r).token_ids for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        assert list(pool.map(lambda r: ask(connection, r).token_ids, requests)) == alone


@pytest.mark.serving
def test_an_openai_client_conversation_equals_hugging_face_pipeline(connection, repository: Path, hf_pipeline) -> None:
    """Through the OpenAI front with the ``openai`` client: an ``image_url`` part in one turn and an ``input_audio``
    part in another, a system turn and an earlier answer give HF's text (decoded from its tokens) and HF's prompt
    length."""
    model, processor = hf_pipeline
    pictures, clips = [image(9, 130, 75)], [noisy_wav(10, 3.2)]
    conversation = hf_conversation(CONVERSATION, image=pictures, audio=[f"clip{i}.wav" for i in range(len(clips))])
    expected = template_then_processor_generate(model, processor, conversation, NEW_TOKENS, pictures, clips)
    prompt_length = template_then_processor_inputs(processor, conversation, pictures, clips)["input_ids"].shape[1]
    assert_openai_chat_as_reference(connection, repository, openai_messages(CONVERSATION, [png(p) for p in pictures], clips),
                                    expected, processor.tokenizer.decode(expected, skip_special_tokens=True), prompt_length)


@pytest.mark.serving
def test_streaming_equals_unary(connection) -> None:
    assert_streaming_equals_unary(connection, Request("Compare the audio with the image.", images=(png(image(3, 130, 75)),),
                                                      audio=(noisy_wav(4, 4.61),), max_tokens=NEW_TOKENS))


@pytest.mark.serving
def test_an_image_of_extreme_aspect_ratio_is_refused(connection) -> None:
    """Its processor raises on an aspect ratio over 200; serving says so."""
    assert_refused(connection, Request("Describe it.", images=(png(image(8, 403, 2)),)), r"image\[0\]: 403x2 has an aspect ratio over 200")


def test_int8_build_passes_the_pipeline_gate_or_falls_back_and_says_so(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert_int8_build_kept_its_promise(checkpoint, tmp_path / "repo", lambda: capsys.readouterr().out,
                                       ["text", "text+image", "text+audio", "text+image+audio"], **LIMITS)
