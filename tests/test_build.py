"""The build as a user runs it: caching, one-line errors, and the last good repository kept."""

from __future__ import annotations

import pytest

from builder.build import build
from tests.conftest import CACHE, run_cli, tree_digest


def test_unchanged_build_does_nothing(tiny_spec, built_repository):
    result = build(tiny_spec, built_repository, CACHE, progress=False)
    assert not result.published and result.seconds < 30
    assert "up to date" in result.summary()


def test_cli_summary_line(built_repository):
    done = run_cli("build", "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("model_repository is up to date: nothing rebuilt")


def test_changing_one_component_rebuilds_only_that_component(tiny_spec, published, tmp_path):
    import dataclasses

    spec = dataclasses.replace(tiny_spec, limits=dataclasses.replace(tiny_spec.limits, max_audio_clips=5))
    result = build(spec, published, CACHE, progress=False)
    assert result.published
    assert result.rebuilt in ((), ("audio_encoder",))  # () when an earlier run cached this very graph
    assert set(result.reused) >= {"vision_encoder", "llm"}
    assert 'string_value: "5"' in (published / "preprocess" / "config.pbtxt").read_text()


@pytest.mark.parametrize(
    ("spec_text", "message"),
    [
        ("name: tiny\ncomponents:\n  vison: {precision: fp32}\n", "components.vison: unknown key (did you mean 'vision'?)"),
        ("name: tiny\nsource: {preset: null, checkpoint: /nonexistent/checkpoint}\n", "directory not found: /nonexistent/checkpoint"),
    ],
)
def test_bad_build_says_one_line_and_keeps_the_repository(spec_text, message, published, tmp_path):
    before = tree_digest(published)
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text)
    done = run_cli("build", "--quiet", "--spec", str(spec), "--output", str(published))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert tree_digest(published) == before


def test_build_side_preprocessing_refuses_what_the_server_refuses(built_repository):
    """Calibration and the bench's in-process baseline preprocess as the server does: a build with the
    vision encoder off refuses images there too (the served facts drop the encoder, the limits agree)."""
    from builder.build import served_facts
    from builder.quantize.calibration_data import server_preprocessor
    from builder.runtime.errors import RequestError
    from builder.runtime.model_facts import ModelFacts
    from builder.spec import load_spec
    from tests.conftest import ROOT

    directory = built_repository / "preprocess" / "1"
    facts = ModelFacts.load(directory / "model_facts.json")
    spec = load_spec(ROOT / "specs" / "tiny.yaml", {"components.vision.enabled": False})
    preprocess = server_preprocessor(spec, served_facts(spec, facts), directory / "tokenizer.json")
    png = next((ROOT / "data" / "calibration" / "images").glob("*.png")).read_bytes()
    with pytest.raises(RequestError, match="image: this model has no vision encoder"):
        preprocess("What is this?", [png], [])
    assert preprocess("Hello", [], []).input_ids.size > 0
