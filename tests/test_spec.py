"""The build spec rejects what it does not understand, naming the key."""

from __future__ import annotations

import pytest

from builder.errors import SpecError
from builder.targets import target_for
from builder.spec import load_spec, parse_spec
from tests.conftest import ROOT


def test_default_spec_loads():
    spec = load_spec(ROOT / "specs" / "tiny.yaml")
    assert spec.source.preset == "tiny" and spec.target == "python"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"components": {"vison": {}}}, r"components\.vison: unknown key \(did you mean 'vision'\?\)"),
        ({"limits": {"max_imgaes": 3}}, r"limits\.max_imgaes: unknown key \(did you mean 'max_images'\?\)"),
        ({"colour": "red"}, r"colour: unknown key"),
        ({"limits": {"max_images": "four"}}, r"limits\.max_images: expected a whole number, got 'four'"),
        ({"limits": {"max_images": True}}, r"limits\.max_images: expected a whole number"),
        ({"components": {"llm": {"precision": "int2"}}}, r"components\.llm\.precision: 'int2' is not one of fp32, fp16, int8, int4"),
        ({"target": "cuda"}, r"target: 'cuda' is not one of"),
        ({"components": {"audio": {"enabled": "yes"}}}, r"components\.audio\.enabled: expected true or false"),
        ({"limits": {"max_prompt_tokens": 600, "max_context": 512}}, r"max_prompt_tokens \(600\) must be smaller than limits\.max_context"),
        ({"limits": {"max_images": 0}}, r"limits\.max_images: must be greater than 0"),
        ({"source": {"preset": "tiny", "checkpoint": "/x"}}, r"source: give exactly one of"),
        ({"components": {"llm": {"enabled": False}}}, r"language model cannot be disabled"),
        ({"name": "../etc"}, r"name: '\.\./etc' must be"),
        ({"limits": []}, r"limits: expected a mapping"),
    ],
)
def test_invalid_specs_name_the_key(data, message):
    """As the build reads a spec: its schema, then the rules of its target."""
    with pytest.raises(SpecError, match=message):
        target_for(parse_spec(data))


def test_overrides_and_file_errors(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\nlimits: {max_images: 2}\n")
    spec = load_spec(path, {"components.llm.precision": "fp16", "target": "python"})
    assert spec.limits.max_images == 2 and spec.components.llm.precision == "fp16"
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "missing.yaml")
    path.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_the_small_spec_builds_the_small_preset_of_about_250m_parameters():
    """`specs/small.yaml` (the realistic benchmark size) loads and names a preset of the size it states; counted on
    the meta device, so no weights are made."""
    import torch
    from transformers import Mistral3ForConditionalGeneration

    from builder.families.mistral3 import build_audio_modules
    from builder.source.tiny import PRESETS

    spec = load_spec(ROOT / "specs" / "small.yaml")
    assert spec.source.preset == "small" and spec.source.checkpoint is None
    config = PRESETS["small"]()
    with torch.device("meta"):
        model = Mistral3ForConditionalGeneration(config)
        audio = build_audio_modules(config)

    def count(*modules: torch.nn.Module) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    assert 180e6 < count(model.model.language_model, model.lm_head) < 200e6
    assert 200e6 < count(model, *audio) < 300e6
    assert config.vision_config.image_size == 224
