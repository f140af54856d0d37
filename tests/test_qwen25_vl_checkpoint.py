"""A Qwen2.5-VL checkpoint as Qwen publishes it builds with no spec options, serves, and answers exactly as HF's
own pipeline.

``Qwen2_5_VLForConditionalGeneration`` written by transformers (odd sizes, BF16 shards, the on-disk key layout), a
Qwen2 tokenizer with Qwen2.5-VL's added tokens, the published chat template and preprocessor_config.json
(tests/hf_qwen25_vl.py). The reference is ``Qwen2_5_VLProcessor.apply_chat_template`` + the processor + ``generate``:
served greedy ``output_ids`` must equal HF's for text, one image, two images of different sizes and a system prompt,
where the decoder's M-RoPE positions follow each image's grid; and an OpenAI client's conversation (images in two
turns, a system turn) through the front gets HF's text and prompt length.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.serve.client import Request, ask
from tests.family_checks import (IMAGE_CONVERSATION, assert_image_conversation_as_reference, assert_next_turn_reuses_the_earlier_one,
                                 assert_refused,
                                 assert_served_as_reference, assert_streaming_equals_unary, family_fixtures, noisy_wav)
from tests.hf_checkpoints import image, png
from tests.hf_qwen25_vl import load_processor, qwen25_vl_pipeline_generate, write_qwen25_vl_checkpoint

NEW_TOKENS = 16
# Built as `make engines CHECKPOINT=dir` builds it: no spec file, the limits following the checkpoint
checkpoint, repository, connection = family_fixtures(write_qwen25_vl_checkpoint, template=None)

# (text, images as (seed, width, height), system prompt)
CASES = {
    "text": ("Describe the colours and the shapes you see.", [], None),
    "one image": ("What is in the picture?", [(1, 97, 61)], None),
    "two images of different sizes": ("Compare the two pictures.", [(2, 300, 200), (3, 40, 50)], None),
    "an image and a system prompt": ("What is in the picture?", [(4, 130, 75)], "Answer in one word."),
}

@pytest.fixture(scope="module")
def hf_pipeline(checkpoint: Path):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval(), load_processor(checkpoint)


@pytest.fixture(scope="module")
def reference(hf_pipeline):
    model, processor = hf_pipeline
    return lambda text, images, system_prompt: qwen25_vl_pipeline_generate(model, processor, text, images, NEW_TOKENS,
                                                                           system_prompt)


def test_only_the_components_the_checkpoint_has(repository: Path) -> None:
    models = {p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file()}
    assert models == {"preprocess", "vision_encoder", "fuse", "llm", "ensemble", "ensemble_stream"}
    facts = json.loads((repository / "llm" / "1" / "model_facts.json").read_text())
    assert facts["family"] == "qwen2_5_vl" and facts["position_rows"] == 3 and facts["image"]["layout"] == "qwen_vl"


@pytest.mark.serving
@pytest.mark.parametrize("case", CASES)
def test_served_greedy_tokens_equal_hugging_face_pipeline(case: str, connection, reference) -> None:
    text, images, system_prompt = CASES[case]
    pictures = [image(*spec) for spec in images]
    request = Request(text, images=tuple(map(png, pictures)), system_prompt=system_prompt, max_tokens=NEW_TOKENS)
    assert_served_as_reference(connection, request, reference(text, pictures, system_prompt))


@pytest.mark.serving
def test_what_an_image_holds_reaches_the_model(connection) -> None:
    """Guards the cases above: two images of the same size but other pixels give other answers."""
    answers = [ask(connection, Request("What is in the picture?", images=(png(image(seed, 97, 61)),),
                                       max_tokens=NEW_TOKENS)).token_ids for seed in (11, 12)]
    assert answers[0] != answers[1]


@pytest.mark.serving
def test_an_openai_client_conversation_equals_hugging_face_pipeline(connection, repository: Path, hf_pipeline) -> None:
    """Through the OpenAI front with the ``openai`` client: ``image_url`` parts in two turns (the second image's
    M-RoPE positions after the first's and an answer), a system turn and an earlier answer give HF's text (decoded from
    its tokens) and HF's prompt length."""
    pictures = [image(7, 97, 61), image(8, 40, 50)]
    assert_image_conversation_as_reference(connection, repository, hf_pipeline, IMAGE_CONVERSATION, pictures, NEW_TOKENS)


@pytest.mark.serving
def test_a_next_turn_reuses_the_earlier_turns_kv_and_equals_hugging_face_pipeline(connection, hf_pipeline) -> None:
    """Turn 2 (turn 1 with its image, the served answer, a new question) prefills from the prefix cache past turn 1's
    prompt (the answer's M-RoPE positions follow the image's), and still gives HF's tokens."""
    first_turn = [{"role": "user", "content": [{"type": "image", "index": 0}, {"type": "text", "text": "What is in the picture?"}]}]
    assert_next_turn_reuses_the_earlier_one(connection, hf_pipeline, first_turn, [image(5, 40, 28)], "And what colour is it?", NEW_TOKENS)


@pytest.mark.serving
def test_streaming_equals_unary(connection) -> None:
    assert_streaming_equals_unary(connection, Request("Compare the two pictures.", max_tokens=NEW_TOKENS,
                                                      images=(png(image(5, 130, 75)), png(image(6, 60, 90)))))


@pytest.mark.serving
def test_audio_to_a_vision_model_is_refused_by_name(connection) -> None:
    assert_refused(connection, Request("What do you hear?", audio=(noisy_wav(1, 1.0),)),
                   r"audio: this model has no audio encoder")
