"""The template graph cut into prologue, one node group per layer and epilogue, and stamped to every layer.

The exporter tags each node with the module scope it came from (``pkg.torch.onnx.name_scopes`` and
``class_hierarchy``); nodes inside a decoder layer belong to it. The prologue (embedding lookup, multimodal
substitution, RoPE tables, masks) and the epilogue (final norm, last position, lm_head) are shared. A layer reads
the previous layer's hidden state, shared prologue values, constants, its own weights and past; anything else
crossing between layers is refused, since stamping could not reproduce it.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

import onnx

from builder.errors import BuildError
from builder.export.streamed.template import Template
from builder.runtime.contract import PAST_PREFIX, PRESENT_PREFIX

_SCOPES, _CLASSES = "pkg.torch.onnx.name_scopes", "pkg.torch.onnx.class_hierarchy"


@dataclass
class LayerNodes:
    nodes: list[onnx.NodeProto]
    hidden_in: str
    hidden_out: str
    weights: list[str]  # template weight names of this layer


@dataclass
class StampedGraph:
    """The whole decoder's nodes (weights still named by wrapper parameter, data not yet written)."""

    nodes: list[onnx.NodeProto]
    inputs: list[onnx.ValueInfoProto]
    outputs: list[onnx.ValueInfoProto]
    constants: list[onnx.TensorProto]  # the template's own small initializers (shapes, scalars)
    weights: dict[str, tuple[str, ...]]  # graph weight name -> the HF model's names of it
    prologue: list[onnx.NodeProto] = field(default_factory=list)
    layers: list[LayerNodes] = field(default_factory=list)  # per real layer, renamed


def _layer_of(node: onnx.NodeProto, layer_class: str) -> int | None:
    props = {p.key: p.value for p in node.metadata_props}
    if _SCOPES not in props or _CLASSES not in props:
        return None
    scopes, classes = ast.literal_eval(props[_SCOPES]), ast.literal_eval(props[_CLASSES])
    for scope, cls in zip(scopes, classes, strict=False):
        if cls == layer_class:
            return int(re.search(r"(\d+)$", scope).group(1))  # "decoder.layers.0" / "decoder.layers.slice(...).0"
    return None


def split_template(template: Template, hidden_size: int) -> tuple[list[onnx.NodeProto], list[LayerNodes], list[onnx.NodeProto]]:
    """(prologue, layers, epilogue) of the template graph.

    A node is a layer's when the exporter tagged it with that layer's scope and it depends on the hidden state,
    the weights or the past; a tagged node that depends on none of them (a shape or a cast of the shared RoPE
    tables, which the optimizer may leave in the first layer that computed it) is shared and goes to the prologue.
    """
    graph = template.model.graph
    count = len(template.kinds.kinds)
    for node in graph.node:
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute):
            raise BuildError(f"llm: template node {node.name} ({node.op_type}) holds a subgraph; it cannot be stamped")
    tagged = [(node, _layer_of(node, template.layer_class)) for node in graph.node]
    first = [node for node, layer in tagged if layer == 0]
    first_produced = {out for node in first for out in node.output}
    shapes = {v.name: v.type for v in [*graph.value_info, *graph.input, *graph.output]}
    entering = [name for name in dict.fromkeys(name for node in first for name in node.input)
                if name and name not in first_produced and name not in template.weights and _is_hidden(shapes.get(name), hidden_size)]
    if len(entering) != 1:
        raise BuildError(f"llm: template layer 0 reads {entering}; expected one hidden state [batch, sequence, {hidden_size}]")
    dependent = {entering[0], *template.weights}
    pasts = {v.name for v in graph.input if v.name.startswith(PAST_PREFIX + ".")}
    prologue: list[onnx.NodeProto] = []
    epilogue: list[onnx.NodeProto] = []
    by_layer: list[list[onnx.NodeProto]] = [[] for _ in range(count)]
    producer_layer: dict[str, int | None] = {}
    for node, layer in tagged:
        # A past's values are the layer's own; its shape (the past length) is the same for every layer: shared.
        reads_past = node.op_type != "Shape" and any(name in pasts for name in node.input)
        if not reads_past and not any(name in dependent for name in node.input):
            prologue.append(node)
            continue
        dependent.update(node.output)
        (epilogue if layer is None else by_layer[layer]).append(node)
        producer_layer.update({out: layer for out in node.output})
    for node in prologue:  # shared nodes may read a past's shape (the same for every layer), never its values
        if node.op_type != "Shape" and any(name.startswith(PAST_PREFIX + ".") for name in node.input):
            raise BuildError(f"llm: shared template node {node.name} ({node.op_type}) reads a layer's past")
    layers = []
    for index, nodes in enumerate(by_layer):
        produced = {out for node in nodes for out in node.output}
        consumed = list(dict.fromkeys(name for node in nodes for name in node.input if name and name not in produced))
        hidden = entering if not index else [name for name in consumed if producer_layer.get(name) == index - 1]
        crossing = [name for name in consumed if producer_layer.get(name) not in (None, index) and name not in hidden]
        if len(hidden) != 1 or crossing:
            raise BuildError(f"llm: template layer {index} reads {hidden + crossing} from other layers; expected one "
                             f"hidden state")
        used_later = {name for other in [*by_layer[index + 1:], epilogue] for node in other for name in node.input}
        outputs = [name for name in produced if name in used_later]
        if len(outputs) != 1:
            raise BuildError(f"llm: template layer {index} hands {outputs} on; expected one hidden state")
        weights = [name for name in consumed if name in template.weights]
        layers.append(LayerNodes(nodes, hidden[0], outputs[0], weights))
    return prologue, layers, epilogue


def _is_hidden(value_type: onnx.TypeProto | None, hidden_size: int) -> bool:
    if value_type is None or not value_type.HasField("tensor_type"):
        return False
    dims = value_type.tensor_type.shape.dim
    return len(dims) == 3 and dims[2].dim_value == hidden_size


def stamp(template: Template) -> StampedGraph:
    """Every real layer as a renamed copy of its kind's template layer, between the shared prologue and epilogue."""
    graph = template.model.graph
    prologue, layers, epilogue = split_template(template, template.facts.hidden_size)
    kinds = template.kinds
    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    new_inputs = [v for v in graph.input if not v.name.startswith(PAST_PREFIX + ".")]
    new_outputs = [v for v in graph.output if not v.name.startswith(PRESENT_PREFIX + ".")]
    weights = {name: names for name, names in template.model_names.items() if name in template.weights
               and not any(name.startswith(prefix + ".") for prefix in template.layer_prefixes)}
    stamped = StampedGraph([_clean(n) for n in prologue], list(new_inputs), list(new_outputs), list(graph.initializer), weights,
                           prologue=[_clean(n) for n in prologue])
    hidden = layers[0].hidden_in  # the prologue's embeddings feed the first layer
    for j, kind in enumerate(kinds.of_layer):
        template_layer = layers[kind]
        old_prefix = template.layer_prefixes[kind]
        new_prefix = f"{old_prefix.rsplit('.', 1)[0]}.{j}"
        produced = {out for node in template_layer.nodes for out in node.output}

        def rename(name: str) -> str:
            if name == template_layer.hidden_in:
                return hidden
            if name.startswith((f"{PAST_PREFIX}.{kind}.", f"{PRESENT_PREFIX}.{kind}.")):
                return name.replace(f".{kind}.", f".{j}.", 1)
            if name in template.weights and name.startswith(old_prefix + "."):
                return new_prefix + name[len(old_prefix):]
            return f"layers.{j}/{name}" if name in produced else name

        nodes = []
        for node in template_layer.nodes:
            copy = _clean(node)
            copy.name = f"layers.{j}/{node.name}"
            copy.input[:] = [rename(name) if name else name for name in node.input]
            copy.output[:] = [rename(name) for name in node.output]
            nodes.append(copy)
        for name in template_layer.weights:
            stamped.weights[rename(name)] = tuple(_relayer(n, kind, j) for n in template.model_names[name])
        for kv in ("key", "value"):
            past, present = inputs[f"{PAST_PREFIX}.{kind}.{kv}"], outputs[f"{PRESENT_PREFIX}.{kind}.{kv}"]
            stamped.inputs.append(_renamed(past, rename(past.name)))
            stamped.outputs.append(_renamed(present, rename(present.name)))
        stamped.layers.append(LayerNodes(nodes, hidden, rename(template_layer.hidden_out),
                                         [rename(name) for name in template_layer.weights]))
        stamped.nodes += nodes
        hidden = rename(template_layer.hidden_out)
    last = layers[-1].hidden_out
    for node in epilogue:
        copy = _clean(node)
        copy.input[:] = [hidden if name == last else name for name in node.input]
        stamped.nodes.append(copy)
    # the graph's own order: inputs then outputs (past/present of layer 0, 1, ...), as the whole-model export has
    stamped.inputs = new_inputs[:5] + sorted(stamped.inputs[len(new_inputs):], key=_kv_order)
    stamped.outputs = new_outputs + sorted(stamped.outputs[len(new_outputs):], key=_kv_order)
    return stamped


def _kv_order(value: onnx.ValueInfoProto) -> tuple[int, int]:
    _, layer, kind = value.name.split(".")
    return int(layer), 0 if kind == "key" else 1


def _relayer(model_name: str, old: int, new: int) -> str:
    """``model.language_model.layers.0.mlp...`` of template layer ``old`` as real layer ``new``."""
    return re.sub(rf"\.layers\.{old}\.", f".layers.{new}.", model_name, count=1)


def _renamed(value: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    copy.name = name
    return copy


def _clean(node: onnx.NodeProto) -> onnx.NodeProto:
    """A copy without the exporter's metadata (stack traces: kilobytes per node, times thousands of nodes)."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del copy.metadata_props[:]
    return copy
