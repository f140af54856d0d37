"""The pre-flight estimate reads sizes from safetensors headers and refuses a build that cannot fit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from safetensors.torch import load_file

from builder.errors import BuildError
from builder.source.preflight import BASE_RAM, SESSION_BYTES_PER_LLM_PARAMETER, component_of, estimate


def test_estimate_counts_every_tensor_from_the_headers(tmp_path: Path) -> None:
    from tests.hf_checkpoints import write_mistral3_checkpoint

    checkpoint = write_mistral3_checkpoint(tmp_path / "checkpoint")
    shards = sorted(checkpoint.glob("*.safetensors"))
    assert len(shards) >= 3
    found = estimate(shards, tmp_path / "cache", "float32", extra_copy=False)
    assert found.parameters == sum(t.numel() for shard in shards for t in load_file(shard).values())
    assert found.checkpoint_bytes == 2 * found.parameters  # BF16 as stored
    named = {name: t for shard in shards for name, t in load_file(shard).items()}
    llm = sum(t.numel() for name, t in named.items() if component_of(name) in ("llm", "embedding"))
    layers = sum(t.numel() for name, t in named.items() if component_of(name) == "llm" and ".layers." in name)
    assert 0 < layers < llm < found.parameters
    # ONNX Runtime's session of the LLM graph, plus what the load holds: all but the decoder's layers, in FP32
    assert found.peak_ram == int(BASE_RAM + SESSION_BYTES_PER_LLM_PARAMETER * llm + 4 * (found.parameters - layers))
    quantized = estimate(shards, tmp_path / "cache", "float32", extra_copy=True)
    assert quantized.disk == 2 * found.disk and quantized.peak_ram > found.peak_ram  # the candidate gated beside it
    half = estimate(shards, tmp_path / "cache", "float16", extra_copy=False)  # an FP16 build loads FP16
    assert half.disk * 2 == found.disk and half.peak_ram < found.peak_ram
    found.check()  # a tiny model fits


def test_a_machine_too_small_is_refused_with_the_numbers(tmp_path: Path) -> None:
    from tests.hf_checkpoints import write_mistral3_checkpoint

    shards = sorted(write_mistral3_checkpoint(tmp_path / "checkpoint").glob("*.safetensors"))
    found = estimate(shards, tmp_path, "float32", extra_copy=False)
    with pytest.raises(BuildError, match=r"not enough memory to build: .*M parameters .* estimated peak RAM .* GB available"):
        dataclasses.replace(found, available_ram=found.peak_ram - 1).check()
    with pytest.raises(BuildError, match=r"not enough disk for the build cache"):
        dataclasses.replace(found, free_disk=found.disk - 1).check()
