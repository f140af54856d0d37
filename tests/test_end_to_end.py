"""A real tritonserver on the built repository answers exactly like the PyTorch source model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from builder.serve.client import Request, ask, ask_stream, request_inputs
from builder.source.reference import reference_generate
from tests.conftest import png_bytes, wav_bytes

NEW_TOKENS = 20
CASES = {
    "text": Request("What is the capital of France?"),
    "text+image": Request("Describe this picture.", images=(png_bytes(1),)),
    "text+audio": Request("Transcribe the recording.", audio=(wav_bytes(1.5, 440),)),
    "text+image+audio": Request(
        "Compare the pictures with the sound.", images=(png_bytes(2), png_bytes(3, (40, 120))),
        audio=(wav_bytes(3.2, 660, rate=22050, channels=2),),
    ),
}


def _reference(request: Request, preprocessor, source_model) -> list[int]:
    inputs = preprocessor(request.prompt, list(request.images), list(request.audio))
    return reference_generate(source_model, inputs, max_new_tokens=NEW_TOKENS)


@pytest.mark.serving
@pytest.mark.parametrize("case", CASES)
def test_greedy_output_equals_pytorch_generate(case, client, preprocessor, source_model):
    request = CASES[case]
    served = ask(client, Request(**{**request.__dict__, "max_tokens": NEW_TOKENS}))
    expected = _reference(request, preprocessor, source_model)
    assert len(expected) == NEW_TOKENS
    assert served.token_ids == expected
    assert len(set(served.token_ids)) >= 4, "degenerate output: the tiny preset's init should make it vary"


@pytest.mark.serving
def test_outputs_depend_on_prompt_image_and_audio(client):
    answers = {case: tuple(ask(client, Request(**{**r.__dict__, "max_tokens": 12})).token_ids) for case, r in CASES.items()}
    assert len(set(answers.values())) == len(CASES)
    # Same prompt, different image: the image reaches the language model.
    other_image = ask(client, Request(CASES["text+image"].prompt, images=(png_bytes(9),), max_tokens=12))
    assert tuple(other_image.token_ids) != answers["text+image"]


@pytest.mark.serving
@pytest.mark.parametrize("case", ["text", "text+image+audio"])
def test_streaming_yields_the_unary_tokens(case, client):
    request = Request(**{**CASES[case].__dict__, "max_tokens": 16})
    unary = ask(client, request)
    chunks = list(ask_stream(client, request))
    # Streamed as produced: the first token on its own, then every token chosen since the previous
    # response (on this tiny model a step is faster than a response's round trip, so they bundle).
    assert len(chunks) >= 2 and len(chunks[0][1]) == 1
    assert [t for _, ids in chunks for t in ids] == unary.token_ids
    assert "".join(text for text, _ in chunks) == unary.text


@pytest.mark.serving
def test_sampling_is_seeded_and_differs_from_greedy(client):
    sampled = Request("Tell me a story.", max_tokens=16, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    first, second = ask(client, sampled), ask(client, sampled)
    greedy = ask(client, Request("Tell me a story.", max_tokens=16))
    assert first.token_ids == second.token_ids
    assert first.token_ids != greedy.token_ids
    assert ask(client, Request(**{**sampled.__dict__, "seed": 8})).token_ids != first.token_ids


@pytest.mark.serving
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(client, preprocessor, source_model):
    corrupt = Request("Describe.", images=(png_bytes(1)[:200],))
    with pytest.raises(InferenceServerException, match=r"image\[0\]"):
        ask(client, corrupt)
    without_text = [t for t in request_inputs(Request("unused", images=(png_bytes(1),))) if t.name() != "text_input"]
    with pytest.raises(InferenceServerException, match="text_input"):
        client.infer("ensemble", without_text)
    with pytest.raises(InferenceServerException, match="max_tokens"):
        ask(client, Request("hi", max_tokens=0))
    with pytest.raises(InferenceServerException, match=r"image\[0\]"):
        list(ask_stream(client, corrupt))
    # ...and a good request right after still gets the reference answer.
    good = CASES["text+image"]
    assert ask(client, Request(**{**good.__dict__, "max_tokens": NEW_TOKENS})).token_ids == _reference(good, preprocessor, source_model)


def test_reference_uses_the_images_and_audio(preprocessor, source_model):
    """Guards the oracle itself: multimodal inputs change the reference's answer."""
    with_image = preprocessor("Describe.", [png_bytes(1)], [])
    without = preprocessor("Describe.", [], [])
    assert not np.array_equal(with_image.input_ids, without.input_ids)
    a = reference_generate(source_model, with_image, 8)
    b = reference_generate(source_model, dataclasses.replace(with_image, pixel_values=with_image.pixel_values * 0), 8)
    assert a != b


@pytest.mark.serving
def test_concurrent_requests_decode_together_and_answer_as_alone(server):
    """Continuous batching: eight requests in flight at once get the answers they get alone."""
    import concurrent.futures

    import tritonclient.grpc as grpcclient

    requests = [Request(f"Question number {i}: {'why ' * i}?", max_tokens=12 + i) for i in range(8)]
    requests[3] = Request(**{**CASES["text+image+audio"].__dict__, "max_tokens": 14})

    def run(request: Request) -> list[int]:
        with grpcclient.InferenceServerClient(server.grpc_url) as connection:
            return ask(connection, request).token_ids

    alone = [run(r) for r in requests]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(run, requests))
    assert together == alone
    assert [len(t) for t in together] == [r.max_tokens for r in requests]
