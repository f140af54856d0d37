"""Every registered family is tested where it matters (as optimum's ``test_all_models_tested``): a served-parity test
on a checkpoint written by its own transformers classes, and an export table for each component it can have."""

from __future__ import annotations

import importlib

import pytest

from builder.families import FAMILIES

# model_type -> the test module whose served greedy tokens must equal Hugging Face's own pipeline
SERVED_PARITY = {
    "mistral3": "tests.test_real_checkpoint",
    "voxtral": "tests.test_voxtral_checkpoint",
    "qwen2_audio": "tests.test_qwen2_audio_checkpoint",
    "gemma3": "tests.test_gemma3_checkpoint",
    "qwen2_5_omni_thinker": "tests.test_qwen25_omni_checkpoint",
    "qwen2_5_vl": "tests.test_qwen25_vl_checkpoint",
}
PARITY_TEST = "test_served_greedy_tokens_equal_hugging_face_pipeline"


def test_every_registered_family_has_a_served_parity_test() -> None:
    assert set(SERVED_PARITY) == set(FAMILIES), "a registered family without a served-parity test (or a stale line here)"
    for family, module in SERVED_PARITY.items():
        test = getattr(importlib.import_module(module), PARITY_TEST, None)
        assert test is not None, f"{module} has no {PARITY_TEST} for {family}"
        assert "serving" in {mark.name for mark in getattr(test, "pytestmark", [])}, f"{module}.{PARITY_TEST} serves nothing"


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_a_family_is_a_package_with_an_export_table(model_type: str) -> None:
    family = FAMILIES[model_type]
    package = importlib.import_module(type(family).__module__)
    assert package.__name__ == f"builder.families.{package.__name__.rsplit('.', 1)[-1]}" and hasattr(package, "__path__")
    recipes = importlib.import_module(f"{package.__name__}.export").RECIPES
    assert "llm" in recipes and set(recipes) <= {"vision_encoder", "audio_encoder", "llm"}
