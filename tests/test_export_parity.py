"""Each exported graph matches its PyTorch module on fresh inputs; a wrong graph is caught."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builder.errors import BuildError
from builder.export.parity import check_parity
from builder.families import FAMILIES
from builder.onnx_files import load_onnx

COMPONENTS = ["vision_encoder", "audio_encoder", "llm"]


@pytest.fixture(scope="module")
def recipes(source_model, tiny_spec):
    family = FAMILIES[source_model.facts.family]
    return {r.component: r for r in family.recipes(source_model, tiny_spec.limits, COMPONENTS)}


def exported(component: str, built_repository: Path, appended_llm: Path) -> Path:
    """The graph the export stage wrote: the repository's encoders; for the LLM the exported form (the repository
    serves it fused, its KV cache in place: tests/test_in_place_kv.py checks that one against this)."""
    return appended_llm if component == "llm" else built_repository / component / "1" / "model.onnx"


@pytest.mark.parametrize("component", COMPONENTS)
def test_exported_graph_matches_pytorch(component, recipes, built_repository, appended_llm, tiny_spec):
    graph = exported(component, built_repository, appended_llm)
    # A seed the build did not use, and three input shapes (batch / sequence / past length vary).
    result = check_parity(recipes[component], graph, samples=3, atol=tiny_spec.export.atol, rtol=tiny_spec.export.rtol, seed=99)
    assert result.min_cosine > 0.99999
    assert result.max_abs_error < 1e-4


@pytest.mark.parametrize("component", ["vision_encoder", "llm"])
def test_a_perturbed_graph_fails_the_check(component, recipes, built_repository, appended_llm, tmp_path):
    model = load_onnx(exported(component, built_repository, appended_llm))
    largest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weights = numpy_helper.to_array(largest).copy()
    weights.flat[: weights.size // 10] *= 1.05  # a 5% error in a tenth of one weight matrix
    largest.CopyFrom(numpy_helper.from_array(weights, largest.name))
    broken = tmp_path / "model.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(BuildError, match=rf"{component}: ONNX output \S+ differs from PyTorch"):
        check_parity(recipes[component], broken, samples=1, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("count, height, width", [(1, 32, 48), (3, 64, 16), (2, 16, 64), (2, 48, 48)])
def test_vision_graph_equals_hugging_face_image_features_at_any_size(count, height, width, source_model, built_repository):
    """Against HF's own ``get_image_features`` (not the export wrapper): the graph's dynamic count, height and width."""
    import onnxruntime as ort
    import torch

    pixels = torch.randn(count, 3, height, width, generator=torch.Generator().manual_seed(height * width))
    session = ort.InferenceSession(str(built_repository / "vision_encoder" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    served = session.run(None, {"pixel_values": pixels.numpy()})[0]
    with torch.no_grad():
        hf = source_model.model.model.get_image_features(
            pixel_values=pixels, image_sizes=torch.tensor([[height, width]] * count), return_dict=True).pooler_output
    cell = source_model.facts.image.cell
    assert served.shape == (count, (height // cell) * (width // cell), source_model.facts.hidden_size)
    # Absolute only: features reach |30|, where any rtol would hide a wrong 2-D position layout
    # (rows and columns swapped moves them by about 1e-3; the graph is within 2e-5).
    np.testing.assert_allclose(served.reshape(-1, served.shape[-1]), torch.cat(list(hf)).numpy(), atol=1e-4, rtol=0)
