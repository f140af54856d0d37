"""The LLM graph of one checkpoint with one decoder layer of each kind, exported without weights.

The family's own wrapper (its ``llm`` recipe: :class:`builder.export.wrappers.LanguageModel` or a family's subclass)
is built on the checkpoint's own transformers classes at full width but with one layer per kind (Gemma 3: a
sliding and a global one), its parameters fake tensors (shape and dtype, no bytes), and exported with torch.onnx as
the whole-model export does. Measured here: the fake 28-layer 6B decoder took 216 s to export, one layer about 20 s,
so the graph is exported with one layer per kind and :mod:`builder.export.streamed.stamp` repeats them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from builder.errors import BuildError
from builder.export.graph import AttentionLayout
from builder.export.onnx_export import _dynamic_shapes_by_position
from builder.export.precision import ExportDtype
from builder.export.recipes import ExportRecipe
from builder.families import family_for
from builder.families.base import SourceModel
from builder.families.shards import empty_model, model_class
from builder.runtime.model_facts import ModelFacts
from builder.source.tokenizer_files import serving_tokenizer
from builder.spec import LimitsSpec


@dataclass(frozen=True)
class LayerKinds:
    """``kinds``: the distinct layer types in first-appearance order (one per template layer); ``of_layer``: each
    real layer's index into ``kinds``."""

    kinds: tuple[str, ...]
    of_layer: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.of_layer)


@dataclass
class Template:
    """The exported graph with ``len(kinds.kinds)`` layers, weights left out: ``weights`` names each missing
    initializer's wrapper parameter (``decoder.layers.0.self_attn.q_proj.weight``...) and its ONNX type."""

    model: onnx.ModelProto
    weights: dict[str, onnx.TypeProto]
    kinds: LayerKinds
    facts: ModelFacts  # the checkpoint's own (all layers)
    layer_prefixes: tuple[str, ...]  # each template layer's module path in the wrapper ("decoder.layers.0")
    model_names: dict[str, tuple[str, ...]]  # wrapper parameter name -> the HF model's names of it (tied: several)
    layer_class: str  # the decoder layer's class as the exporter's node metadata names it
    attention: AttentionLayout | None  # of the checkpoint's layers (all of them), as the family's wrapper says


def text_config_of(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def layer_kinds(config: Any) -> LayerKinds:
    """A layer's kind is its ``layer_types`` entry (sliding / full attention); configs without one have one kind."""
    text = text_config_of(config)
    types = list(getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers)
    kinds = tuple(dict.fromkeys(types))
    return LayerKinds(kinds, tuple(kinds.index(kind) for kind in types))


def reduced_config(directory: Path, kinds: LayerKinds) -> Any:
    """The checkpoint's config with one decoder layer per kind."""
    config = model_class(directory).config_class.from_pretrained(directory)
    text = text_config_of(config)
    text.num_hidden_layers = len(kinds.kinds)
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = list(kinds.kinds)
    return config


def export_template(directory: Path, dtype: ExportDtype, limits: LimitsSpec, opset: int) -> Template:
    """The family's LLM graph with one layer per kind; ``dtype``: the weights' (and KV cache's) type."""
    family = family_for(directory)
    full_config = model_class(directory).config_class.from_pretrained(directory)
    kinds = layer_kinds(full_config)
    facts = family.read_facts(directory, serving_tokenizer(directory))
    if facts.num_layers != kinds.num_layers:
        raise BuildError(f"{directory}: layer_types lists {kinds.num_layers} layers, num_hidden_layers {facts.num_layers}")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = empty_model(model_class(directory), reduced_config(directory, kinds), mode, getattr(torch, dtype))
    source = SourceModel(directory, model, dataclasses.replace(facts, num_layers=len(kinds.kinds)))
    (recipe,) = family.recipes(source, limits, ["llm"])
    program = _export(recipe, opset)
    graph = program.model.graph
    model_names: dict[int, tuple[str, ...]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):  # tied weights: one tensor, several names
        model_names[id(param)] = (*model_names.get(id(param), ()), name)
    wrapper_names = {name: model_names[id(p)] for name, p in recipe.module.named_parameters(remove_duplicate=False)}
    weights: dict[str, onnx.TypeProto] = {}
    for name, value in list(graph.initializers.items()):
        tensor = getattr(value.const_value, "raw", None)
        if isinstance(tensor, FakeTensor):
            if name not in wrapper_names:
                raise BuildError(f"{directory}: the exported LLM graph holds weight {name}, which is no parameter")
            value.const_value = None  # no bytes: the optimizer leaves it alone, the stamp fills it in
            del graph.initializers[name]
            weights[name] = ir.serde.serialize_type(value.type) if value.type is not None else onnx.TypeProto()
    onnxscript.optimizer.optimize_ir(program.model)
    layers = recipe.module.decoder.layers
    prefixes = tuple(_module_path(recipe.module, layer) for layer in layers)
    layer_class = f"{type(layers[0]).__module__}.{type(layers[0]).__qualname__}"
    return Template(ir.serde.serialize_model(program.model), weights, kinds, facts, prefixes, wrapper_names, layer_class,
                    recipe.module.attention_layout(kinds.num_layers))


def _module_path(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, found in root.named_modules() if found is module)


def _export(recipe: ExportRecipe, opset: int) -> Any:
    example = recipe.sample_inputs(torch.Generator().manual_seed(0), 0)
    chatter = io.StringIO()
    for chatty in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(chatty).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            # optimize=False: constant folding would read the fake weights; the optimizer runs once they are gone.
            return torch.onnx.export(
                recipe.module, example, input_names=recipe.input_names, output_names=recipe.output_names,
                dynamic_shapes=_dynamic_shapes_by_position(recipe), opset_version=opset, dynamo=True, optimize=False,
            )
    except Exception as exc:  # the exporter raises many types; all mean the same to the user
        raise BuildError(f"llm: ONNX export of the layer template failed: {str(exc).splitlines()[0]}") from exc
