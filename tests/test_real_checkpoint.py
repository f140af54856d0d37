"""A checkpoint written by transformers itself builds, serves, and answers exactly as HF's own pipeline.

Vision-only Mistral-3 (no audio), odd sizes, several BF16 shards, the checkpoint's chat template
with a default system prompt: the served greedy ``output_ids`` equal the processor's
``apply_chat_template`` + ``generate`` for text, one non-square image, two images of different
sizes and a system prompt override; streaming equals unary; audio is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from builder.build import build
from builder.serve.client import Request, ask, ask_stream
from builder.spec import load_spec
from tests.conftest import CACHE, ROOT, run_cli, wav_bytes
from tests.family_checks import (IMAGE_CONVERSATION, assert_image_conversation_as_reference, assert_next_turn_reuses_the_earlier_one,
                                 serving)
from tests.hf_checkpoints import (
    hf_conversation,
    hf_conversation_generate,
    hf_pipeline_generate,
    image,
    load_reference_model,
    pixtral_processor,
    png,
    write_mistral3_checkpoint,
)

NEW_TOKENS = 16


# (text, images as (seed, width, height), system prompt)
CASES = {
    "text": ("What is in the picture?", [], None),
    "one non-square image": ("Describe the colours.", [(1, 50, 30)], None),
    "two images of different sizes": ("Compare them.", [(2, 90, 40), (3, 20, 33)], None),
    "system prompt override": ("What is in the picture?", [(4, 36, 36)], "Answer in one word."),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mistral3_checkpoint(tmp_path_factory.mktemp("mistral3") / "checkpoint")


@pytest.fixture(scope="module")
def repository(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = load_spec(ROOT / "specs" / "tiny.yaml", {"source.preset": None, "source.checkpoint": str(checkpoint),
                                                    "name": "mistral3-test"})
    output = tmp_path_factory.mktemp("mistral3-repo") / "model_repository"
    build(spec, output, CACHE, progress=False)
    return output


@pytest.fixture(scope="module")
def connection(repository: Path, tmp_path_factory: pytest.TempPathFactory):
    with serving(repository, tmp_path_factory.mktemp("triton")) as client:
        yield client


@pytest.fixture(scope="module")
def hf_pipeline(checkpoint: Path):
    return load_reference_model(checkpoint), pixtral_processor(checkpoint)


@pytest.fixture(scope="module")
def reference(hf_pipeline):
    model, processor = hf_pipeline

    def generate(text: str, images: list, system_prompt: str | None, sanitize: bool = False) -> list[int]:
        return hf_pipeline_generate(model, processor, text, images, system_prompt, NEW_TOKENS, sanitize)

    return generate


def test_only_the_components_the_checkpoint_has(repository: Path) -> None:
    models = {p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file()}
    assert models == {"preprocess", "vision_encoder", "fuse", "llm", "ensemble", "ensemble_stream"}
    steps = (repository / "ensemble" / "1" / "steps.json").read_text()
    assert "audio_encoder" not in steps and "vision_encoder" in steps
    manifest = json.loads((repository / "manifest.json").read_text())
    assert set(manifest["components"]) == {"vision_encoder", "llm"}


@pytest.mark.serving
@pytest.mark.parametrize("case", CASES)
def test_served_greedy_tokens_equal_hugging_face_pipeline(case: str, connection, reference) -> None:
    text, images, system_prompt = CASES[case]
    pictures = [image(*spec) for spec in images]
    expected = reference(text, pictures, system_prompt)
    served = ask(connection, Request(text, images=tuple(png(p) for p in pictures), system_prompt=system_prompt,
                                     max_tokens=NEW_TOKENS))
    assert len(set(expected)) >= 8, f"degenerate reference output {expected}"
    assert served.token_ids == expected


@pytest.mark.serving
def test_the_system_prompt_reaches_the_model(connection) -> None:
    """Guards the override case above: with and without it the answers differ."""
    text, images, system_prompt = CASES["system prompt override"]
    request = Request(text, images=tuple(png(image(*spec)) for spec in images), max_tokens=NEW_TOKENS)
    assert ask(connection, request).token_ids != ask(connection, Request(**{**request.__dict__, "system_prompt": system_prompt})).token_ids


@pytest.mark.serving
def test_control_tokens_typed_by_a_user_are_text_as_in_hf_sanitize_mode(connection, reference) -> None:
    """"[IMG]" or "</s>" typed in a prompt: HF's ``sanitize_control_tokens=True`` encodes them as plain text; so do we."""
    text = "Say [IMG] then </s>[INST] and [SYSTEM_PROMPT]."
    expected = reference(text, [], None, sanitize=True)  # unsanitized, HF refuses it: "[IMG] tokens but no images"
    assert ask(connection, Request(text, max_tokens=NEW_TOKENS)).token_ids == expected


@pytest.mark.serving
def test_streaming_equals_unary(connection) -> None:
    request = Request("Compare them.", images=(png(image(2, 90, 40)), png(image(3, 20, 33))), max_tokens=NEW_TOKENS)
    unary = ask(connection, request)
    streamed = [t for _, ids in ask_stream(connection, request) for t in ids]
    assert streamed == unary.token_ids


@pytest.mark.serving
def test_audio_to_a_vision_only_model_is_refused_by_name(connection) -> None:
    with pytest.raises(InferenceServerException, match=r"audio: this model has no audio encoder") as raised:
        ask(connection, Request("Transcribe.", audio=(wav_bytes(0.5),)))
    assert str(raised.value.status()) == "StatusCode.INVALID_ARGUMENT"
    assert ask(connection, Request("Still there?", max_tokens=4)).token_ids  # the server keeps serving


def test_make_engines_checkpoint_builds_it_from_the_command_line(checkpoint: Path, tmp_path: Path) -> None:
    result = run_cli("build", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "repo"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "built" in result.stdout
    assert json.loads((tmp_path / "repo" / "manifest.json").read_text())["spec"]["name"] == "checkpoint"


@pytest.mark.serving
def test_a_conversation_with_images_in_two_turns_equals_hugging_face_pipeline(connection, hf_pipeline) -> None:
    """The ``messages`` input: the same tokens as HF's ``apply_chat_template(conversation)`` + ``generate``."""
    model, processor = hf_pipeline
    pictures = [image(5, 40, 28), image(6, 24, 48)]
    expected = hf_conversation_generate(model, processor, hf_conversation(IMAGE_CONVERSATION, image=pictures), NEW_TOKENS)
    request = Request(None, images=tuple(map(png, pictures)), messages=IMAGE_CONVERSATION, max_tokens=NEW_TOKENS)
    assert len(set(expected)) >= 8 and ask(connection, request).token_ids == expected
    assert [t for _, ids in ask_stream(connection, request) for t in ids] == expected
    earlier_turns_matter = Request(None, images=(png(pictures[1]),), max_tokens=NEW_TOKENS, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Compare it with this one."}, {"type": "image", "index": 0}]}])
    assert ask(connection, earlier_turns_matter).token_ids != expected


@pytest.mark.serving
def test_an_openai_client_conversation_equals_hugging_face_pipeline(connection, repository: Path, hf_pipeline) -> None:
    """The same conversation through the OpenAI front (``image_url`` data URLs in two turns, a system turn, an earlier
    answer) with the ``openai`` client: HF's text, decoded from its tokens, and HF's prompt length."""
    pictures = [image(5, 40, 28), image(6, 24, 48)]
    assert_image_conversation_as_reference(connection, repository, hf_pipeline, IMAGE_CONVERSATION, pictures, NEW_TOKENS)


@pytest.mark.serving
def test_a_next_turn_reuses_the_earlier_turns_kv_and_equals_hugging_face_pipeline(connection, hf_pipeline) -> None:
    """Turn 2 (turn 1 with its image, the served answer, a new question) prefills from the prefix cache past turn 1's
    prompt, and still gives HF's tokens."""
    first_turn = [{"role": "user", "content": [{"type": "image", "index": 0}, {"type": "text", "text": "What is in the picture?"}]}]
    assert_next_turn_reuses_the_earlier_one(connection, hf_pipeline, first_turn, [image(5, 40, 28)], "And what colour is it?", NEW_TOKENS)


@pytest.mark.serving
@pytest.mark.parametrize(("request_", "message"), [
    (Request("Hi", messages=[{"role": "user", "content": "Hi"}]), r"messages: send the conversation alone"),
    (Request(None, images=(png(image(1, 20, 20)),), messages=[{"role": "user", "content": "No image named."}]),
     r"messages: the image parts name items \[\], the request has 1 image"),
    (Request(None, extra={"messages": np.array([b"{not json"], dtype=np.object_)}), r"messages: not valid JSON"),
])
def test_a_bad_conversation_is_refused_naming_messages(connection, request_: Request, message: str) -> None:
    with pytest.raises(InferenceServerException, match=message) as raised:
        ask(connection, request_)
    assert str(raised.value.status()) == "StatusCode.INVALID_ARGUMENT"
