"""The pre-flight estimate reads sizes from safetensors headers and refuses a build that cannot fit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from safetensors.torch import load_file

from builder.errors import BuildError
from builder.source.headers import component_of
from builder.source.preflight import BASE_RAM, SESSION_BYTES_PER_LLM_PARAMETER, estimate


def test_estimate_counts_every_tensor_from_the_headers(tmp_path: Path) -> None:
    from tests.hf_checkpoints import write_mistral3_checkpoint

    checkpoint = write_mistral3_checkpoint(tmp_path / "checkpoint")
    shards = sorted(checkpoint.glob("*.safetensors"))
    assert len(shards) >= 3
    found = estimate(shards, tmp_path / "cache", "fp32", quantized=False)
    assert found.parameters == sum(t.numel() for shard in shards for t in load_file(shard).values())
    assert found.checkpoint_bytes == 2 * found.parameters  # BF16 as stored
    named = {name: t for shard in shards for name, t in load_file(shard).items()}
    llm = sum(t.numel() for name, t in named.items() if component_of(name) in ("llm", "embedding"))
    layers = sum(t.numel() for name, t in named.items() if component_of(name) == "llm" and ".layers." in name)
    assert 0 < layers < llm < found.parameters
    # ONNX Runtime's session of the LLM graph, plus what the load holds: the encoders, in FP32
    assert found.peak_ram == int(BASE_RAM + SESSION_BYTES_PER_LLM_PARAMETER * llm + 4 * (found.parameters - llm))
    assert found.disk == 4 * found.parameters  # the FP32 graphs; the in-place LLM graph shares the exported one's weights
    half = estimate(shards, tmp_path / "cache", "fp16", quantized=False)  # an FP16 build loads FP16
    assert half.disk * 2 == found.disk and half.peak_ram < found.peak_ram
    # No FP32 LLM graph for an integer LLM: its candidate's bytes (4-bit: fewer), beside the PyTorch reference's parts
    int8, int4 = (estimate(shards, tmp_path / "cache", p, quantized=True) for p in ("int8", "int4"))
    assert int4.peak_ram <= int8.peak_ram < found.peak_ram and int4.disk < int8.disk < found.disk
    found.check()  # a tiny model fits


def test_a_machine_too_small_is_refused_with_the_numbers(tmp_path: Path) -> None:
    from tests.hf_checkpoints import write_mistral3_checkpoint

    shards = sorted(write_mistral3_checkpoint(tmp_path / "checkpoint").glob("*.safetensors"))
    found = estimate(shards, tmp_path, "fp32", quantized=False)
    with pytest.raises(BuildError, match=r"not enough memory to build: .*M parameters .* estimated peak RAM .* GB available"):
        dataclasses.replace(found, available_ram=found.peak_ram - 1).check()
    with pytest.raises(BuildError, match=r"not enough disk for the build cache"):
        dataclasses.replace(found, free_disk=found.disk - 1).check()


def test_a_ladder_that_falls_to_a_float_graph_it_cannot_hold_stops_with_the_numbers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-flight counted on the requested INT4; when every integer rung fails, the FP32 graph would need 4 bytes
    a parameter: on a machine without them the build stops naming the rungs and the RAM, before writing it."""
    from builder.quantize.ladder import FP32_RUNG, _check_float_fits
    from tests.hf_checkpoints import write_mistral3_checkpoint

    checkpoint = write_mistral3_checkpoint(tmp_path / "checkpoint")
    _check_float_fits(checkpoint, FP32_RUNG, [])  # a tiny model fits this machine
    needed = estimate(sorted(checkpoint.glob("*.safetensors")), checkpoint, "fp32", quantized=True).peak_ram
    monkeypatch.setattr("builder.source.preflight._available_ram", lambda: needed - 1)
    with pytest.raises(BuildError, match=r"every integer rung failed the LLM gate .* fp32 graph needs about .* GB of RAM"):
        _check_float_fits(checkpoint, FP32_RUNG, [])
