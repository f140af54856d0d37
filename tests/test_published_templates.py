"""Chat templates as published checkpoints carry them, built as `make engines CHECKPOINT=dir` builds (no spec file)
and served by a real tritonserver: tokens equal HF's own pipeline (PixtralProcessor's apply_chat_template +
generate) on the same Mistral-3 checkpoint.

- A system turn taken only as a string (``'[SYSTEM_PROMPT]' + system_message``, as older Mistral, community and
  mistral-common's generated templates write it): the build once crashed probing it with text blocks.
- No system turn at all (``raise_exception``): the build serves it, and a request with a system prompt is refused
  in the template's own words, as HF's pipeline raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.build import build
from builder.serve.client import Request
from tests.conftest import CACHE
from tests.family_checks import assert_refused, assert_served_as_reference, assert_streaming_equals_unary, family_spec, serving
from tests.hf_checkpoints import (
    hf_pipeline_generate,
    image,
    load_reference_model,
    pixtral_processor,
    png,
    write_mistral3_checkpoint,
)

NEW_TOKENS = 12
_USER_TURNS = """
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {{- '[INST]' }}
        {%- for block in message['content'] %}
            {%- if block['type'] == 'text' %}{{- block['text'] }}{%- else %}{{- '[IMG]' }}{%- endif %}
        {%- endfor %}
        {{- '[/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}"""
TEMPLATES = {
    "string system turn": """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if system_message is defined %}
    {{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}
{%- endif %}""" + _USER_TURNS,
    "no system turn": """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {{- raise_exception('System role not supported') }}
{%- endif %}
{%- set loop_messages = messages %}""" + _USER_TURNS,
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mistral3_checkpoint(tmp_path_factory.mktemp("published") / "weights")


@pytest.fixture(scope="module", params=TEMPLATES)
def served(request: pytest.FixtureRequest, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """(template name, gRPC client, HF reference) for the checkpoint carrying that template."""
    checkpoint = tmp_path_factory.mktemp("checkpoint") / "checkpoint"
    checkpoint.mkdir()
    for path in weights.iterdir():
        (checkpoint / path.name).symlink_to(path)
    (checkpoint / "chat_template.jinja").unlink()
    (checkpoint / "chat_template.jinja").write_text(TEMPLATES[request.param])
    output = tmp_path_factory.mktemp("repository") / "model_repository"
    build(family_spec(None, checkpoint), output, CACHE, progress=False)
    model, processor = load_reference_model(checkpoint), pixtral_processor(checkpoint)

    def reference(text: str, pictures: list, system_prompt: str | None) -> list[int]:
        return hf_pipeline_generate(model, processor, text, pictures, system_prompt, NEW_TOKENS)

    with serving(output, tmp_path_factory.mktemp("triton")) as client:
        yield request.param, client, reference


@pytest.mark.serving
def test_served_tokens_equal_hugging_face_pipeline(served) -> None:
    name, client, reference = served
    pictures = [image(1, 40, 28), image(2, 20, 44)]
    request = Request("Compare the two pictures.", images=tuple(map(png, pictures)), max_tokens=NEW_TOKENS)
    assert_served_as_reference(client, request, reference(request.prompt, pictures, None))
    assert_streaming_equals_unary(client, request)


@pytest.mark.serving
def test_a_system_prompt_as_the_template_takes_it(served) -> None:
    name, client, reference = served
    pictures = [image(3, 36, 36)]
    request = Request("What is in the picture?", images=(png(pictures[0]),), system_prompt="Answer in one word.",
                      max_tokens=NEW_TOKENS)
    if name == "no system turn":
        with pytest.raises(Exception, match="System role not supported"):
            reference(request.prompt, pictures, request.system_prompt)
        assert_refused(client, request, r"chat template: System role not supported")
        return
    assert_served_as_reference(client, request, reference(request.prompt, pictures, request.system_prompt))
    assert_streaming_equals_unary(client, request)
