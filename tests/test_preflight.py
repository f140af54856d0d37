"""The pre-flight estimate reads sizes from safetensors headers and refuses a build that cannot fit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from safetensors.torch import load_file

from builder.errors import BuildError
from builder.source.preflight import PEAK_RAM_PER_LOADED_BYTE, estimate


def test_estimate_counts_every_tensor_from_the_headers(tmp_path: Path) -> None:
    from tests.hf_checkpoints import write_mistral3_checkpoint

    checkpoint = write_mistral3_checkpoint(tmp_path / "checkpoint")
    shards = sorted(checkpoint.glob("*.safetensors"))
    assert len(shards) >= 3
    tensors = [t for shard in shards for t in load_file(shard).values()]
    found = estimate(shards, tmp_path / "cache", "float32", extra_copy=False)
    assert found.parameters == sum(t.numel() for t in tensors)
    assert found.checkpoint_bytes == 2 * found.parameters  # BF16 as stored
    assert found.peak_ram > PEAK_RAM_PER_LOADED_BYTE["float32"] * 4 * found.parameters
    assert estimate(shards, tmp_path / "cache", "float32", extra_copy=True).disk == 2 * found.disk
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
