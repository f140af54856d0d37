"""A checkpoint's weights one tensor at a time, under the HF model's parameter names, and a model whose decoder
layers are read from the shards only while they run.

Checkpoint keys are the ones ``save_pretrained`` writes (``language_model.model.layers.N...`` for Mistral-3), which
transformers renames as it loads (``model.language_model.layers.N...``); its own renaming rules
(``get_model_conversion_mapping``) map them here, so each family's layout is the one transformers reads.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key
from transformers.initialization import no_init_weights

from builder.errors import BuildError


class CheckpointTensors:
    """The tensors of a checkpoint directory by model parameter name; each read opens its shard (memory-mapped)
    and closes it again, so no shard stays mapped (mapped pages that were read count as resident memory)."""

    def __init__(self, directory: Path, meta_model: nn.Module) -> None:
        self.directory = directory
        shard_of: dict[str, Path] = {}
        for shard in sorted(Path(directory).glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                shard_of.update({key: shard for key in handle.keys()})  # noqa: SIM118 (no __iter__)
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

    def has(self, name: str) -> bool:
        return name in self._key_of

    def key(self, names: tuple[str, ...]) -> str:
        """The checkpoint key of a parameter known by ``names`` (tied weights: any of them is stored)."""
        for name in names:
            if name in self._key_of:
                return self._key_of[name]
        raise BuildError(f"{self.directory}: no weight for {' / '.join(names)} in the safetensors shards")

    def shape(self, names: tuple[str, ...]) -> tuple[int, ...]:
        key = self.key(names)
        with safe_open(str(self._shard_of[key]), framework="pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def read(self, names: tuple[str, ...]) -> torch.Tensor:
        """The stored tensor (in the checkpoint's dtype), copied out of the shard."""
        key = self.key(names)
        with safe_open(str(self._shard_of[key]), framework="pt") as handle:
            return handle.get_tensor(key)


def model_class(directory: Path) -> type[transformers.PreTrainedModel]:
    """The checkpoint's own transformers class, from ``config.json``'s ``architectures``."""
    names = transformers.PretrainedConfig.get_config_dict(str(directory))[0].get("architectures") or []
    found = [getattr(transformers, name) for name in names if hasattr(transformers, name)]
    if not found:
        raise BuildError(f"{directory / 'config.json'}: architectures {names} names no transformers class")
    return found[0]


@contextlib.contextmanager
def fake_parameters(mode: FakeTensorMode | None, dtype: torch.dtype | None) -> Iterator[None]:
    """Modules built inside get parameters without storage: fake tensors of ``mode`` in ``dtype`` (floating ones), or
    meta tensors when ``mode`` is None. Buffers stay real: RoPE's ``inv_freq`` and Gemma's embedding scale are
    computed from the config, and the graph needs their values."""
    register = nn.Module.register_parameter

    def register_empty(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is None:
            return
        target = dtype if dtype is not None and param.is_floating_point() else param.dtype
        empty = param.to("meta", target)
        if mode is not None:
            empty = FakeTensor(mode, empty, torch.device("cpu"))
        module._parameters[name] = nn.Parameter(empty, requires_grad=False)

    nn.Module.register_parameter = register_empty  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_model(cls: type[nn.Module], config: Any, mode: FakeTensorMode | None, dtype: torch.dtype | None,
                load_dtype: torch.dtype | None = None) -> nn.Module:
    """``cls`` on ``config`` with parameters that hold no bytes (see :func:`fake_parameters`); given ``load_dtype``,
    built as ``from_pretrained(dtype=load_dtype)`` builds it: its attention implementation (SDPA, not eager, in
    every sub-model) and buffers in that dtype."""
    # no_init_weights: initializers (SigLIP's truncated normal) would read the empty parameters
    with fake_parameters(mode, dtype), no_init_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config) if load_dtype is None else cls._from_config(config, dtype=load_dtype)
        return model.eval()


def load_layers_on_demand(cls: type[nn.Module], directory: Path, config: Any, dtype: str,
                          may_be_missing: tuple[str, ...] = ()) -> nn.Module:
    """``cls`` on ``config`` with the encoders' weights read from the shards in ``dtype``, and the text decoder's
    layers, its embedding table and its lm_head each read when it runs and dropped after: a forward holds the
    encoders and one of those (a 131k x 5120 embedding table is 2.7 GB in FP32: the gates' PyTorch reference runs in
    FP32). Every weight's presence and shape is checked first, as ``from_pretrained`` would."""
    load_dtype = getattr(torch, dtype)
    model = empty_model(cls, config, None, None, load_dtype)
    tensors = CheckpointTensors(directory, model)
    kept_fp32 = {name for module in model.modules()
                 for name in [*(getattr(module, "_keep_in_fp32_modules", None) or []),
                              *(getattr(module, "_keep_in_fp32_modules_strict", None) or [])]}
    on_demand = [*model.get_decoder().layers, model.get_input_embeddings(), model.get_output_embeddings()]
    on_demand = [module for module in on_demand if module is not None]
    in_layer = {id(p) for module in on_demand for p in module.parameters()}
    aliases: dict[int, tuple[str, ...]] = {}  # tied weights: one parameter, several names
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases[id(param)] = (*aliases.get(id(param), ()), name)
    missing, mismatched = [], []
    for names in aliases.values():
        if not any(tensors.has(n) for n in names):
            if not names[0].startswith(may_be_missing):
                missing.append(names[0])
            continue
        param = model.get_parameter(names[0])
        if tensors.shape(names) != tuple(param.shape):
            mismatched.append(f"{names[0]} {tensors.shape(names)} != {tuple(param.shape)}")
    if missing or mismatched:
        raise BuildError(f"{directory}: weights do not match config.json ({len(missing)} missing, "
                         f"{len(mismatched)} mismatched: {', '.join((missing + mismatched)[:3])})")

    def cast(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        keep = any(part in kept_fp32 for part in name.split("."))
        return tensor.to(torch.float32 if keep else load_dtype)

    def read(names: tuple[str, ...]) -> nn.Parameter:
        # requires_grad as from_pretrained leaves it: torch.export specializes a dynamic batch of an encoder otherwise
        return nn.Parameter(cast(names[0], tensors.read(names)))

    for names in aliases.values():
        first = model.get_parameter(names[0])
        if id(first) in in_layer or not any(tensors.has(n) for n in names):
            continue
        loaded = read(names)
        for name in names:
            _set_parameter(model, name, loaded)
    for part in on_demand:
        prefix = next(name for name, module in model.named_modules() if module is part)
        _read_on_demand(part, {local: (f"{prefix}.{local}",) for local, _ in part.named_parameters()}, read)
    return model


def _set_parameter(root: nn.Module, name: str, value: nn.Parameter) -> None:
    owner, _, attribute = name.rpartition(".")
    root.get_submodule(owner)._parameters[attribute] = value


def _read_on_demand(layer: nn.Module, names: dict[str, tuple[str, ...]], read: Any) -> None:
    """``layer``'s parameters read before each of its forwards and put back to meta after it (the lm_head: after the
    wrapper's one call on the last position, or the reference's on the positions it scores)."""
    empty = {local: layer.get_parameter(local) for local in names}

    def load(module: nn.Module, args: Any) -> None:
        for local, full in names.items():
            _set_parameter(module, local, read(full))

    def drop(module: nn.Module, args: Any, output: Any) -> None:
        for local, param in empty.items():
            _set_parameter(module, local, param)

    layer.register_forward_pre_hook(load)
    layer.register_forward_hook(drop)
