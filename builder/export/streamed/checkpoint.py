"""One tensor at a time from a checkpoint's safetensors shards, under the HF model's parameter names.

Checkpoint keys are the ones ``save_pretrained`` writes (``language_model.model.layers.N...`` for Mistral-3), which
transformers renames as it loads (``model.language_model.layers.N...``); its own renaming rules
(``get_model_conversion_mapping``) map them here, so each family's layout is the one transformers reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key

from builder.errors import BuildError
from builder.source.checkpoint import check_checkpoint


class CheckpointTensors:
    """The tensors of a checkpoint directory by model parameter name; each read opens its shard (memory-mapped)
    and closes it again, so no shard stays mapped (mapped pages that were read count as resident memory)."""

    def __init__(self, directory: Path, meta_model: nn.Module) -> None:
        self.directory = directory
        shard_of: dict[str, Path] = {}
        for shard in check_checkpoint(directory).weight_files:
            with safe_open(str(shard), framework="pt") as handle:
                shard_of.update({key: shard for key in handle.keys()})
        conversions = get_model_conversion_mapping(meta_model)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if not isinstance(c, WeightRenaming)]
        meta_state = meta_model.state_dict()
        self._key_of: dict[str, str] = {}  # model name -> checkpoint key
        for key in shard_of:
            name, converter = rename_source_key(key, renamings, converters, meta_model.base_model_prefix, meta_state)
            if converter is None:  # converted tensors (fused or split on load) are not read one by one here
                self._key_of[name] = key
        # A tied lm_head is stored once, as the embedding table (from_pretrained ties them after loading).
        for target, source in meta_model.get_expanded_tied_weights_keys(all_submodels=True).items():
            if target not in self._key_of and source in self._key_of:
                self._key_of[target] = self._key_of[source]
        self._shard_of = shard_of

    def key(self, names: tuple[str, ...]) -> str:
        """The checkpoint key of a parameter known by ``names`` (tied weights: any of them is stored)."""
        for name in names:
            if name in self._key_of:
                return self._key_of[name]
        raise BuildError(f"{self.directory}: no weight for {' / '.join(names)} in the safetensors shards")

    def read(self, names: tuple[str, ...]) -> torch.Tensor:
        """The stored tensor (in the checkpoint's dtype), copied out of the shard."""
        key = self.key(names)
        with safe_open(str(self._shard_of[key]), framework="pt") as handle:
            return handle.get_tensor(key)
