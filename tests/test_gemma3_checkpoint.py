"""A Gemma 3 checkpoint as Google publishes it builds, serves, and answers exactly as HF's own pipeline.

``Gemma3ForConditionalGeneration`` written by transformers (see ``tests/hf_gemma3.py``): images squashed to one
square, each ``<start_of_image>`` expanded in the text to 16 soft tokens between newlines, the soft tokens of an
image attending to each other both ways in the prefill, sliding-window layers whose window the prompts cross. The
reference is ``Gemma3Processor.apply_chat_template`` + ``generate``; served greedy ``output_ids`` must equal it for
text, one image, two images of different sizes and a system prompt.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from builder.build import build
from builder.serve.client import Request, ask, ask_stream
from builder.spec import BuildSpec
from tests.conftest import CACHE, wav_bytes
from tests.family_checks import assert_int8_kept_its_promise, family_spec, serving
from tests.hf_checkpoints import image
from tests.hf_gemma3 import gemma3_pipeline_generate, write_gemma3_checkpoint

NEW_TOKENS = 16

# (text, images as (seed, width, height), system prompt)
CASES = {
    "text": ("What is in the picture?", [], None),
    "one image": ("Describe the colours.", [(1, 90, 50)], None),
    "two images of different sizes": ("Compare the two pictures.", [(2, 40, 64), (3, 100, 100)], None),
    "a system prompt": ("Describe the colours.", [(4, 30, 80)], "Answer in one word."),
}


def png(picture) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def gemma3_spec(template: str, checkpoint: Path) -> BuildSpec:
    return family_spec(template, checkpoint, max_prompt_tokens=256, max_context=320)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gemma3_checkpoint(tmp_path_factory.mktemp("gemma3") / "checkpoint")


@pytest.fixture(scope="module")
def repository(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("gemma3-repo") / "model_repository"
    build(gemma3_spec("tiny.yaml", checkpoint), output, CACHE, progress=False)
    return output


@pytest.fixture(scope="module")
def connection(repository: Path, tmp_path_factory: pytest.TempPathFactory):
    with serving(repository, tmp_path_factory.mktemp("triton")) as client:
        yield client


@pytest.fixture(scope="module")
def reference(checkpoint: Path):
    import torch
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    return lambda text, images, system_prompt: gemma3_pipeline_generate(model, processor, text, images, NEW_TOKENS,
                                                                        system_prompt)


def test_only_the_components_the_checkpoint_has(repository: Path) -> None:
    models = {p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file()}
    assert models == {"preprocess", "vision_encoder", "fuse", "llm", "llm_stream", "ensemble", "ensemble_stream"}
    assert set(json.loads((repository / "manifest.json").read_text())["components"]) == {"vision_encoder", "llm"}


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
def test_what_an_image_holds_reaches_the_model(connection) -> None:
    answers = [ask(connection, Request("Describe the colours.", images=(png(image(seed, 90, 50)),),
                                       max_tokens=NEW_TOKENS)).token_ids for seed in (11, 12)]
    assert answers[0] != answers[1]


@pytest.mark.serving
def test_streaming_equals_unary(connection) -> None:
    request = Request("Compare the two pictures.", images=(png(image(2, 40, 64)), png(image(3, 100, 100))),
                      max_tokens=NEW_TOKENS)
    unary = ask(connection, request)
    streamed = [t for _, ids in ask_stream(connection, request) for t in ids]
    assert streamed == unary.token_ids


@pytest.mark.serving
def test_audio_to_a_vision_only_model_is_refused_by_name(connection) -> None:
    with pytest.raises(InferenceServerException, match=r"audio: this model has no audio encoder") as raised:
        ask(connection, Request("Transcribe.", audio=(wav_bytes(0.5),)))
    assert str(raised.value.status()) == "StatusCode.INVALID_ARGUMENT"
    assert ask(connection, Request("Still there?", max_tokens=4)).token_ids  # the server keeps serving


def test_int8_build_passes_the_pipeline_gate_or_falls_back_and_says_so(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    spec = gemma3_spec("tiny-int8.yaml", checkpoint)
    build(spec, tmp_path / "repo", CACHE, progress=False)
    assert_int8_kept_its_promise(spec, tmp_path / "repo", capsys.readouterr().out, ["text", "text+image"])
