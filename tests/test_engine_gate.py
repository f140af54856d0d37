"""The `engine_gate` encoder model (targets onnxruntime/tensorrt) served by a real tritonserver on CPU.

The CPU server has only the Python backend, so a toy Python model stands in for the native engine
model (`vision_encoder_onnxruntime`): batched across requests like the real one, doubling the
first values of each image, and answering an error for negative pixels.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton")
grpcclient = pytest.importorskip("tritonclient.grpc")

from tritonclient.utils import InferenceServerException  # noqa: E402

from builder.repository.assemble import assemble_repository, render_model_config  # noqa: E402
from builder.repository.plan import ModelPlan, Tensor, per_request  # noqa: E402
from builder.runtime.model_facts import ImageFacts, ModelFacts  # noqa: E402
from builder.serve.tritonserver import TritonServer  # noqa: E402

pytestmark = pytest.mark.serving

TOKENS, HIDDEN = 2, 8
ENGINE = "vision_encoder_onnxruntime"

TOY_ENGINE = f"""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            pixels = pb_utils.get_input_tensor_by_name(request, "pixel_values").as_numpy()
            if (pixels < 0).any():
                error = pb_utils.TritonError("toy engine: negative pixels")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            embeds = 2 * pixels.reshape(len(pixels), -1)[:, :{TOKENS * HIDDEN}].reshape(-1, {TOKENS}, {HIDDEN})
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("image_embeds", embeds)]))
        return responses
"""


def write_repository(root: Path, facts_file: Path) -> None:
    # A Pixtral-style vision encoder: its layout feeds each size's images to the engine as pixel_values.
    image = ImageFacts(token=1, row_break=2, end=3, patch_size=2, merge_size=1, longest_edge=64, mean=(0.5, 0.5, 0.5),
                       std=(0.5, 0.5, 0.5), token_text="[IMG]")
    ModelFacts("toy", vocab_size=16, hidden_size=HIDDEN, num_layers=1, num_kv_heads=1, head_dim=HIDDEN, stop_ids=(0,),
               image=image, audio=None).save(facts_file)
    gate = ModelPlan(
        "vision_encoder", "python_model.pbtxt.j2",
        inputs=(per_request(Tensor("pixel_values", "TYPE_FP32", (-1, 3, -1, -1))), per_request(Tensor("image_sizes", "TYPE_INT64", (-1, 2)))),
        outputs=(per_request(Tensor("image_embeds", "TYPE_FP32", (-1, HIDDEN))),),
        python_model="engine_gate", files={"model_facts.json": facts_file},
        parameters={"graph_inputs": "pixel_values", "output": "image_embeds", "engine_model": ENGINE},
    )
    assemble_repository([gate], root, {})  # the gate as the build writes it: its config and model.py
    engine = ModelPlan(
        ENGINE, "python_model.pbtxt.j2", inputs=(Tensor("pixel_values", "TYPE_FP32", (3, -1, -1)),),
        outputs=(Tensor("image_embeds", "TYPE_FP32", (TOKENS, HIDDEN)),), max_batch_size=8, dynamic_batching=True,
    )
    (root / ENGINE / "1").mkdir(parents=True)
    (root / ENGINE / "config.pbtxt").write_text(render_model_config(engine))
    (root / ENGINE / "1" / "model.py").write_text(textwrap.dedent(TOY_ENGINE))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("engine_gate")
    write_repository(root / "repo", root / "model_facts.json")
    with TritonServer(root / "repo", log_path=root / "server.log") as server:
        with grpcclient.InferenceServerClient(server.grpc_url) as connection:
            yield connection


def encode(client, pixels: np.ndarray, sizes: np.ndarray | None = None) -> np.ndarray:
    """``pixels`` padded to the largest image, as preprocess sends them (with the leading request axis);
    ``sizes`` default to the full size."""
    if sizes is None:
        sizes = np.array([pixels.shape[2:]] * len(pixels), dtype=np.int64).reshape(-1, 2)
    pixels, sizes = pixels[None], sizes[None]
    inputs = [grpcclient.InferInput("pixel_values", list(pixels.shape), "FP32"),
              grpcclient.InferInput("image_sizes", list(sizes.shape), "INT64")]
    inputs[0].set_data_from_numpy(pixels)
    inputs[1].set_data_from_numpy(sizes)
    return client.infer("vision_encoder", inputs).as_numpy("image_embeds")[0]


def toy(image: np.ndarray) -> np.ndarray:
    return 2 * image.reshape(-1)[: TOKENS * HIDDEN].reshape(TOKENS, HIDDEN)


def engine_inferences(client, expected: int | None = None) -> int:
    """The engine's inference count; with ``expected``, read until it is that or 5 s passed: Triton records a
    batch's statistics after its responses went out, so on a busy machine the last batch can still be missing."""
    deadline = time.monotonic() + 5
    while True:
        (stats,) = client.get_inference_statistics(ENGINE).model_stats
        if expected is None or stats.inference_count == expected or time.monotonic() > deadline:
            return stats.inference_count
        time.sleep(0.05)


def test_no_images_are_answered_by_the_gate_itself(client):
    before = engine_inferences(client)
    embeds = encode(client, np.zeros((0, 3, 4, 4), dtype=np.float32))
    assert embeds.shape == (0, HIDDEN) and embeds.dtype == np.float32
    assert engine_inferences(client) == before  # an engine has no batch of 0: never asked


def test_images_are_forwarded_per_size_and_come_back_in_order(client):
    before = engine_inferences(client)
    rng = np.random.default_rng(0)
    small, large, small2 = rng.random((3, 4, 4), dtype=np.float32), rng.random((3, 8, 4), dtype=np.float32), rng.random((3, 4, 4), dtype=np.float32)
    pixels = np.zeros((3, 3, 8, 4), dtype=np.float32)
    pixels[0, :, :4], pixels[1], pixels[2, :, :4] = small, large, small2
    embeds = encode(client, pixels, np.array([[4, 4], [8, 4], [4, 4]], dtype=np.int64))
    np.testing.assert_array_equal(embeds, np.concatenate([toy(small), toy(large), toy(small2)]))
    assert engine_inferences(client, before + 3) == before + 3  # counted per image: a batch of two 4x4, one of 8x4


def test_an_engine_error_is_the_requests_error(client):
    with pytest.raises(InferenceServerException, match=f"{ENGINE}: toy engine: negative pixels"):
        encode(client, -np.ones((1, 3, 4, 4), dtype=np.float32))
    assert encode(client, np.ones((1, 3, 4, 4), dtype=np.float32)).shape == (TOKENS, HIDDEN)  # and it serves on
