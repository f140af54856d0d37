"""The LLM graph as ONNX Runtime serves it: the KV cache written in place, the rest in ONNX Runtime's fused kernels.

The exported graph (every family's, FP32 / FP16 / INT8 / INT4 alike) appends a step's keys and values to the past
with ``Concat``: a copy of the whole cache per layer per step, which at a 512-token context and batch 8 was a fifth
of a step, and three copies of it alive at once. Here (:func:`write_fused`):

- :func:`fuse_attention`: each layer's ``Concat(past, new) -> present`` pair, the grouped-query ``MatMul``s
  (:func:`builder.export.attention.grouped_query_attention`), the additive mask and the softmax become one
  ``com.microsoft.GroupQueryAttention``, which reads the cache up to each row's own length (``seqlens_k``) and applies
  the causal mask and the sliding window itself; its past and present are one buffer the runner binds to both
  (:mod:`builder.runtime.kv_slots`). The projections feed it without the exporter's view/transpose pairs, and it
  rotates the query and key itself when :func:`fuse_rotary` found their rotation.
- :func:`fuse_rotary`: HF's rotary embedding as ``RotaryEmbedding`` over the graph's own cos/sin tables.
- :func:`fuse_rms_norms`: HF's RMSNorm as ``SimplifiedLayerNormalization``, with the residual Add before it as
  ``SkipSimplifiedLayerNormalization``.
- :func:`pack_qkv`: the attention reads q, k and v packed from their one projection (the streamed writer's).

The graph keeps its inputs and outputs: ``attention_mask`` then means "row b holds its first ``sum(mask[b])``
positions" (right-padded), and the past and present are the cache's buffer of a fixed capacity. The graph says so in
its metadata (:data:`KV_LAYOUT_KEY`). The anchors are the graph's own contract (``present.{i}.key`` made by a
``Concat`` of ``past_key_values.{i}.key``) and the two attention ``MatMul``s that read each present; everything
between them that nothing else reads any more is dropped. A graph whose attention has another shape is refused with
the node that did not match; a rotation or norm in another form is left as it is.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from builder.errors import BuildError
from builder.export.graph import AttentionLayout
from builder.export.streamed.writer import topological
from builder.onnx_files import data_files, link_or_copy
from builder.runtime.contract import (
    ATTENTION_MASK,
    KV_IN_PLACE,
    KV_LAYOUT_KEY,
    PAST_PREFIX,
    POSITION_IDS,
    PRESENT_PREFIX,
)
from builder.runtime.generation import LanguageModelRunner, SamplingParams
from builder.runtime.model_facts import ModelFacts

_MS = "com.microsoft"


def unfusable(layout: AttentionLayout) -> str | None:
    """Why ONNX Runtime's GroupQueryAttention cannot compute this attention (None: it can)."""
    if layout.head_dim % 8:
        return f"head_dim {layout.head_dim} is not a multiple of 8 (ONNX Runtime's GroupQueryAttention needs one)"
    return None


def fuse_attention(model: onnx.ModelProto, layout: AttentionLayout) -> onnx.ModelProto:
    """``model`` (its weights may stay external) with every layer's attention fused; changed in place and returned."""
    reason = unfusable(layout)
    if reason is not None:
        raise BuildError(f"llm: the KV cache cannot be updated in place: {reason}")
    graph = model.graph
    producer, consumers = _edges(graph.node)
    constants = {t.name: t for t in graph.initializer}
    presents = [o.name for o in graph.output if o.name.startswith(f"{PRESENT_PREFIX}.") and o.name.endswith(".key")]
    if len(presents) != len(layout.windows):
        raise BuildError(f"llm: the graph has {len(presents)} present keys, the checkpoint {len(layout.windows)} layers")
    added: list[onnx.NodeProto] = [*_sequence_lengths()]
    initializers = [
        numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), "gqa/to_bsd"),
        numpy_helper.from_array(np.array([0, 0, layout.num_heads, layout.head_dim], dtype=np.int64), "gqa/to_bshd"),
        numpy_helper.from_array(np.array([0, layout.num_kv_heads, -1, layout.head_dim], dtype=np.int64), "gqa/to_grouped"),
    ]
    replaced: set[int] = set()
    for present_key in presents:
        layer = int(present_key.split(".")[1])
        present_value = f"{PRESENT_PREFIX}.{layer}.value"
        key_concat, value_concat = _concat(producer, present_key, layer), _concat(producer, present_value, layer)
        scores = _single(consumers, producer, present_key, "Transpose", "MatMul", layer)
        weighted = next((n for n in consumers[present_value] if n.op_type == "MatMul" and n.input[1] == present_value), None)
        grouped_query = producer.get(scores.input[0])
        if weighted is None or grouped_query is None or grouped_query.op_type != "Reshape":
            raise BuildError(f"llm: layer {layer}'s attention is not the grouped-query MatMuls this fusion knows")
        scale = _scale(consumers[scores.output[0]], constants, producer, layer)
        window = layout.windows[layer]
        prefix = f"gqa/{layer}"

        def to_bsd(name: str, what: str) -> str:
            """[B, heads, S, d] -> [B, S, heads * d]: the projection's own output when ``name`` is its
            ``view(B, S, heads, d).transpose(1, 2)``, else a transpose of ``name``."""
            projection = _projection_of(producer, name)
            if projection is not None:
                return projection
            added.append(helper.make_node("Transpose", [name], [f"{prefix}/{what}_bshd"], perm=[0, 2, 1, 3]))
            added.append(helper.make_node("Reshape", [f"{prefix}/{what}_bshd", "gqa/to_bsd"], [f"{prefix}/{what}"]))
            return f"{prefix}/{what}"

        rotated = _rotated_projections(producer, grouped_query.input[0], key_concat.input[1], value_concat.input[1])
        if rotated is not None:  # GroupQueryAttention rotates the query and key itself, from the same tables
            (query, key, value), tables = rotated
        else:
            query, key, value = (to_bsd(grouped_query.input[0], "query"), to_bsd(key_concat.input[1], "key"),
                                 to_bsd(value_concat.input[1], "value"))
            tables = []
        # The exported heads go back to [B, S, heads * d] (Reshape, Transpose, Reshape) before o_proj: GroupQueryAttention's
        # output is that tensor already. Another tail gets the grouped layout back instead.
        tail = _heads_to_hidden(consumers, weighted.output[0])
        output = tail[-1].output[0] if tail else f"{prefix}/output"
        added.append(helper.make_node(
            "GroupQueryAttention",
            [query, key, value, key_concat.input[0], value_concat.input[0], "gqa/seqlens_k", "gqa/total_sequence_length",
             *tables],
            [output, present_key, present_value], name=f"{prefix}/GroupQueryAttention", domain=_MS,
            num_heads=layout.num_heads, kv_num_heads=layout.num_kv_heads, scale=scale, do_rotary=int(bool(tables)),
            # both count the query's own position: HF's sliding_window 4 is local_window_size 4 (tests/test_in_place_kv.py)
            local_window_size=window or -1,
        ))
        if tail:
            replaced.update(id(n) for n in tail)
        else:  # the grouped layout the rest of the layer reads: [B, S, heads * d] -> [B, kv_heads, groups * S, d]
            added.append(helper.make_node("Reshape", [output, "gqa/to_bshd"], [f"{prefix}/output_bshd"]))
            added.append(helper.make_node("Transpose", [f"{prefix}/output_bshd"], [f"{prefix}/output_bhsd"], perm=[0, 2, 1, 3]))
            added.append(helper.make_node("Reshape", [f"{prefix}/output_bhsd", "gqa/to_grouped"], [weighted.output[0]]))
        replaced.update(id(n) for n in (key_concat, value_concat, weighted))
    _rebuild(model, [n for n in graph.node if id(n) not in replaced] + added, initializers)
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, KV_LAYOUT_KEY: KV_IN_PLACE})
    return model


def fuse_rms_norms(model: onnx.ModelProto) -> int:
    """Each RMSNorm as torch.onnx writes HF's FP32 one (``w * (x * 1 / sqrt(mean(x^2) + eps))``, seven nodes) as ONNX
    Runtime's ``SimplifiedLayerNormalization`` (one kernel, which ONNX Runtime's own fusions do not find in this
    form), and with the residual Add before it as ``SkipSimplifiedLayerNormalization``; the number of norms fused.
    Norms in another form (FP16 casts, Gemma's ``1 + w``) are left as they are."""
    graph = model.graph
    producer, consumers = _edges(graph.node)
    constants = {t.name: t for t in graph.initializer}

    def only(name: str, op: str) -> onnx.NodeProto | None:
        found = consumers.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op else None

    def const(name: str) -> np.ndarray | None:
        return _constant(name, constants, producer)

    replaced: dict[int, onnx.NodeProto | None] = {}  # node -> what takes its place (None: dropped)
    for power in [n for n in graph.node if n.op_type == "Pow"]:
        x = power.input[0]
        exponent = const(power.input[1])
        mean = only(power.output[0], "ReduceMean")
        add = only(mean.output[0], "Add") if mean is not None else None
        sqrt = only(add.output[0], "Sqrt") if add is not None else None
        reciprocal = only(sqrt.output[0], "Reciprocal") if sqrt is not None else None
        scaled = only(reciprocal.output[0], "Mul") if reciprocal is not None else None
        weighted = only(scaled.output[0], "Mul") if scaled is not None else None
        if exponent is None or float(exponent.reshape(-1)[0]) != 2.0 or weighted is None or x not in scaled.input:
            continue
        axes = const(mean.input[1]) if len(mean.input) > 1 else next(
            (np.array(a.ints) for a in mean.attribute if a.name == "axes"), None)
        epsilon = const(next(i for i in add.input if i != mean.output[0]))
        if axes is None or axes.reshape(-1).tolist() != [-1] or epsilon is None or epsilon.size != 1:
            continue
        weight = next(i for i in weighted.input if i != scaled.output[0])
        norm = helper.make_node("SimplifiedLayerNormalization", [x, weight], [weighted.output[0]],
                                name=f"{weighted.name or weighted.output[0]}/rms_norm", axis=-1,
                                epsilon=float(epsilon.reshape(())), stash_type=1)
        replaced.update({id(n): None for n in (power, mean, add, sqrt, reciprocal, scaled)})
        replaced[id(weighted)] = norm
    nodes = [n for n in (replaced.get(id(n), n) for n in graph.node) if n is not None]
    del graph.node[:]
    graph.node.extend(_with_skips(nodes, constants))
    return sum(1 for n in replaced.values() if n is not None)


def _with_skips(nodes: list[onnx.NodeProto], constants: dict[str, onnx.TensorProto]) -> list[onnx.NodeProto]:
    """``nodes`` with each residual ``Add(a, b)`` that a SimplifiedLayerNormalization reads as
    ``com.microsoft.SkipSimplifiedLayerNormalization(a, b)``, which gives the norm and the sum (for the next residual)
    in one kernel. An Add of a constant (a bias, which might broadcast) is left alone."""
    producer = {out: node for node in nodes for out in node.output}
    produced_by_nodes = {out for node in nodes for out in node.output}
    replaced: dict[int, onnx.NodeProto | None] = {}
    for norm in [n for n in nodes if n.op_type == "SimplifiedLayerNormalization" and n.domain == ""]:
        add = producer.get(norm.input[0])
        if add is None or add.op_type != "Add" or id(add) in replaced or \
                any(i in constants or i not in produced_by_nodes for i in add.input):
            continue
        epsilon = next(a.f for a in norm.attribute if a.name == "epsilon")
        replaced[id(add)] = None
        replaced[id(norm)] = helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], norm.input[1]],
            [norm.output[0], "", "", add.output[0]], name=f"{norm.name}/skip", domain=_MS, epsilon=epsilon)
    return [n for n in (replaced.get(id(n), n) for n in nodes) if n is not None]


def fuse_rotary(model: onnx.ModelProto, max_positions: int) -> int:
    """Each rotary embedding as torch.onnx writes HF's (``x * cos + rotate_half(x) * sin``, seven nodes on a
    [B, heads, S, d] query or key) as one ``com.microsoft.RotaryEmbedding`` reading the graph's own ``position_ids``
    and cos / sin tables of ``max_positions`` rows, which are the graph's own cos and sin computed once here for
    positions 0, 1, 2...; the number fused. Not for M-RoPE's [3, B, S] positions, nor when the tables depend on more
    than the positions (or their halves differ: not HF's ``cat(freqs, freqs)``): those are left as they are."""
    graph = model.graph
    positions = next((i for i in graph.input if i.name == POSITION_IDS), None)
    if positions is None or len(positions.type.tensor_type.shape.dim) != 2:
        return 0
    producer = {out: node for node in graph.node for out in node.output}
    tables: dict[tuple[str, str], tuple[str, str] | None] = {}
    initializers: list[onnx.TensorProto] = []
    replaced: dict[int, onnx.NodeProto] = {}
    for add in [n for n in graph.node if n.op_type == "Add"]:
        found = _rotary(add, producer)
        if found is None:
            continue
        x, cos, sin = found
        if (cos, sin) not in tables:
            computed = _tables(model, cos, sin, max_positions)
            tables[(cos, sin)] = None
            if computed is not None:
                names = (f"rotary/{len(tables)}/cos_cache", f"rotary/{len(tables)}/sin_cache")
                initializers += [numpy_helper.from_array(t, n) for t, n in zip(computed, names)]
                tables[(cos, sin)] = names
        if tables[(cos, sin)] is None:
            continue
        cos_cache, sin_cache = tables[(cos, sin)]
        replaced[id(add)] = helper.make_node("RotaryEmbedding", [x, POSITION_IDS, cos_cache, sin_cache], list(add.output),
                                             name=f"{add.name or add.output[0]}/rotary", domain=_MS, interleaved=0)
    if replaced:
        _rebuild(model, [replaced.get(id(n), n) for n in graph.node], initializers)
    return len(replaced)


def _rotary(add: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> tuple[str, str, str] | None:
    """(x, cos, sin) when ``add`` is ``x * cos + cat(-x[..., d/2:], x[..., :d/2]) * sin`` (either operand order)."""
    muls = [producer.get(name) for name in add.input]
    if len(muls) != 2 or any(m is None or m.op_type != "Mul" for m in muls):
        return None
    for direct, rotated in (muls, muls[::-1]):
        concat_index = next((i for i, name in enumerate(rotated.input)
                             if producer.get(name) is not None and producer[name].op_type == "Concat"), None)
        if concat_index is None:
            continue
        concat = producer[rotated.input[concat_index]]
        sin = rotated.input[1 - concat_index]
        if len(concat.input) != 2:
            continue
        neg, low = producer.get(concat.input[0]), producer.get(concat.input[1])
        high = producer.get(neg.input[0]) if neg is not None and neg.op_type == "Neg" else None
        if high is None or low is None or high.op_type != "Slice" or low.op_type != "Slice" or high.input[0] != low.input[0]:
            continue
        x = high.input[0]
        if x not in direct.input:
            continue
        return x, direct.input[1 - list(direct.input).index(x)], sin
    return None


def _tables(model: onnx.ModelProto, cos: str, sin: str, max_positions: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The graph's cos and sin for positions 0..max_positions - 1 as RotaryEmbedding's [positions, d / 2] caches;
    None when they read more than ``position_ids`` and inline constants, or their two halves differ."""
    import onnxruntime as ort

    graph = model.graph
    nodes = _live(list(graph.node), [cos, sin])
    produced = {out for node in nodes for out in node.output}
    constants = {t.name: t for t in graph.initializer}
    read = {name for node in nodes for name in node.input if name and name not in produced}
    if read - set(constants) != {POSITION_IDS} or any(constants[n].data_location == onnx.TensorProto.EXTERNAL
                                                       for n in read & set(constants)):
        return None
    inputs = [i for i in graph.input if i.name == POSITION_IDS]
    outputs = [onnx.ValueInfoProto(name=name) for name in (cos, sin)]  # types inferred
    sub = helper.make_model(helper.make_graph(nodes, "rotary_tables", inputs, outputs, [constants[n] for n in read - {POSITION_IDS}]),
                            opset_imports=list(model.opset_import), ir_version=model.ir_version)
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(None, {POSITION_IDS: np.arange(max_positions, dtype=np.int64)[None]})
    caches = []
    for value in values:
        table = value.reshape(max_positions, -1)  # [1, 1, P, d] (or [1, P, d]): one row per position
        half = table.shape[1] // 2
        if not np.array_equal(table[:, :half], table[:, half:]):
            return None
        caches.append(np.ascontiguousarray(table[:, :half]))
    return caches[0], caches[1]


def _rebuild(model: onnx.ModelProto, nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto]) -> None:
    """``model``'s graph as ``nodes`` (those no output needs dropped, the rest in dependency order), with the
    initializers that are still read, ``initializers`` added."""
    graph = model.graph
    nodes = _live(nodes, [o.name for o in graph.output])
    available = {i.name for i in graph.input} | {t.name for t in [*graph.initializer, *initializers]}
    ordered = topological(nodes, available)
    used = {name for node in ordered for name in node.input}
    kept = [t for t in [*graph.initializer, *initializers] if t.name in used]
    del graph.node[:]
    graph.node.extend(ordered)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]  # shapes of values that may be gone; ONNX Runtime infers its own
    if not any(o.domain == _MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS, 1))


def pack_qkv(model: onnx.ModelProto) -> int:
    """Each GroupQueryAttention whose query, key and value are one Split of one projection (the streamed writer writes
    Linears that read one input as one MatMul: ``builder.export.streamed.writer``) takes that projection as its packed
    input, and the Split goes. The number of layers so fed."""
    graph = model.graph
    producer, consumers = _edges(graph.node)
    dropped: set[int] = set()
    for attention in [n for n in graph.node if n.op_type == "GroupQueryAttention" and n.domain == _MS]:
        split = producer.get(attention.input[0])
        if split is None or split.op_type != "Split" or list(split.output) != list(attention.input[:3]) or \
                any(len(consumers[name]) != 1 for name in split.output):
            continue
        attention.input[0], attention.input[1], attention.input[2] = split.input[0], "", ""
        dropped.add(id(split))
    if dropped:
        _rebuild(model, [n for n in graph.node if id(n) not in dropped], [])
    return len(dropped)


def write_fused(source: Path, directory: Path, layout: AttentionLayout, max_positions: int) -> Path:
    """``source``'s graph fused into ``directory/model.onnx`` (attention, rotary embeddings up to ``max_positions``,
    RMSNorms, packed q/k/v); its weight files linked (copied across file systems) beside it under their own names, so
    the external-data locations hold."""
    model = onnx.load(str(source), load_external_data=False)
    fuse_rotary(model, max_positions)  # first: the attention then rotates [B, S, heads * d] where the graph does
    fuse_attention(model, layout)
    fuse_rms_norms(model)
    pack_qkv(model)
    directory.mkdir(parents=True, exist_ok=True)
    for data in data_files(source):
        target = directory / data.name
        target.unlink(missing_ok=True)
        link_or_copy(data, target)
    path = directory / "model.onnx"
    onnx.save_model(model, str(path))
    return path


def _edges(nodes: Iterable[onnx.NodeProto]) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """Each value's producing node, and the nodes reading it."""
    producer: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in nodes:
        producer.update({out: node for out in node.output})
        for name in node.input:
            consumers[name].append(node)
    return producer, consumers


def _sequence_lengths() -> list[onnx.NodeProto]:
    """GroupQueryAttention's ``seqlens_k`` (each row's positions - 1) and ``total_sequence_length`` (the longest
    row's), both int32, from the right-padded attention mask."""
    return [
        helper.make_node("Constant", [], ["gqa/axis1"], value=numpy_helper.from_array(np.array([1], dtype=np.int64))),
        helper.make_node("ReduceSum", [ATTENTION_MASK, "gqa/axis1"], ["gqa/lengths"], keepdims=0),
        helper.make_node("Cast", ["gqa/lengths"], ["gqa/lengths_i32"], to=onnx.TensorProto.INT32),
        helper.make_node("Constant", [], ["gqa/one"], value=numpy_helper.from_array(np.array(1, dtype=np.int32))),
        helper.make_node("Sub", ["gqa/lengths_i32", "gqa/one"], ["gqa/seqlens_k"]),
        helper.make_node("Shape", [ATTENTION_MASK], ["gqa/mask_shape"], start=1, end=2),
        helper.make_node("Cast", ["gqa/mask_shape"], ["gqa/total_1"], to=onnx.TensorProto.INT32),
        helper.make_node("Constant", [], ["gqa/scalar"], value=numpy_helper.from_array(np.array([], dtype=np.int64))),
        helper.make_node("Reshape", ["gqa/total_1", "gqa/scalar"], ["gqa/total_sequence_length"]),
    ]


def _concat(producer: dict[str, onnx.NodeProto], present: str, layer: int) -> onnx.NodeProto:
    node = producer.get(present)
    kind = present.rsplit(".", 1)[1]
    axis = next((a.i for a in node.attribute if a.name == "axis"), None) if node is not None else None
    if node is None or node.op_type != "Concat" or len(node.input) != 2 or axis not in (2, -2) \
            or node.input[0] != f"{PAST_PREFIX}.{layer}.{kind}":
        raise BuildError(f"llm: {present} is not Concat({PAST_PREFIX}.{layer}.{kind}, new) along the sequence")
    return node


def _single(consumers: dict[str, list[onnx.NodeProto]], producer: dict[str, onnx.NodeProto], present: str,
            first: str, then: str, layer: int) -> onnx.NodeProto:
    """The ``then`` node reading ``present`` through one ``first`` node (the keys' Transpose before the scores)."""
    for node in consumers[present]:
        if node.op_type == first:
            found = [n for n in consumers[node.output[0]] if n.op_type == then and n.input[1] == node.output[0]]
            if len(found) == 1:
                return found[0]
    raise BuildError(f"llm: layer {layer}'s keys do not reach a {then} through a {first}")


def _scale(readers: list[onnx.NodeProto], constants: dict[str, onnx.TensorProto], producer: dict[str, onnx.NodeProto],
           layer: int) -> float:
    """The factor the scores are multiplied by right after their MatMul."""
    for node in readers:
        if node.op_type == "Mul":
            for name in node.input:
                value = _constant(name, constants, producer)
                if value is not None and value.size == 1:
                    return float(value.reshape(()))
    raise BuildError(f"llm: layer {layer}'s attention scores are not scaled by a constant")


def _constant(name: str, constants: dict[str, onnx.TensorProto], producer: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    if name in constants:
        return numpy_helper.to_array(constants[name])
    node = producer.get(name)
    if node is not None and node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def _rotated_projections(producer: dict[str, onnx.NodeProto], query: str, key: str, value: str
                         ) -> tuple[tuple[str, str, str], list[str]] | None:
    """The three projections' [B, S, heads * d] outputs, and GroupQueryAttention's rotary inputs (cos and sin tables,
    positions), when the query and key are each one RotaryEmbedding (:func:`fuse_rotary`) of the same tables over
    their projection's heads and the value is its projection's heads; None otherwise."""
    rotaries = [producer.get(name) for name in (query, key)]
    if any(r is None or r.op_type != "RotaryEmbedding" or r.domain != _MS for r in rotaries) or \
            rotaries[0].input[1:] != rotaries[1].input[1:]:
        return None
    projections = [_projection_of(producer, r.input[0]) for r in rotaries] + [_projection_of(producer, value)]
    if any(p is None for p in projections):
        return None
    position_ids, cos_cache, sin_cache = rotaries[0].input[1:]
    return (projections[0], projections[1], projections[2]), [cos_cache, sin_cache, position_ids]


def _projection_of(producer: dict[str, onnx.NodeProto], heads: str) -> str | None:
    """``p`` when ``heads`` is ``Transpose(Reshape(p), perm=(0, 2, 1, 3))`` and ``p`` comes straight from a
    projection (a MatMul, its bias Add, the Split of packed ones): HF's ``proj(x).view(B, S, heads, d)
    .transpose(1, 2)``, so ``p`` is [B, S, heads * d]. None otherwise (a per-head norm between the view and the
    transpose, say)."""
    transpose = producer.get(heads)
    if transpose is None or transpose.op_type != "Transpose" or \
            [list(a.ints) for a in transpose.attribute if a.name == "perm"] != [[0, 2, 1, 3]]:
        return None
    view = producer.get(transpose.input[0])
    if view is None or view.op_type != "Reshape":
        return None
    source = producer.get(view.input[0])
    return view.input[0] if source is not None and source.op_type in ("MatMul", "MatMulNBits", "Add", "Split") else None


def _heads_to_hidden(consumers: dict[str, list[onnx.NodeProto]], grouped: str) -> list[onnx.NodeProto]:
    """The Reshape -> Transpose(0, 2, 1, 3) -> Reshape that alone reads the attention's grouped output and makes
    [B, S, heads * d] of it (:func:`builder.export.attention.grouped_query_attention`, then HF's reshape); [] if not."""
    chain, name = [], grouped
    for op in ("Reshape", "Transpose", "Reshape"):
        readers = consumers.get(name, [])
        if len(readers) != 1 or readers[0].op_type != op:
            return []
        if op == "Transpose" and [list(a.ints) for a in readers[0].attribute if a.name == "perm"] != [[0, 2, 1, 3]]:
            return []
        chain.append(readers[0])
        name = readers[0].output[0]
    return chain


def _live(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """The nodes some graph output depends on."""
    producer = {out: node for node in nodes for out in node.output}
    needed, stack, live = set(outputs), list(outputs), set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in live:
            continue
        live.add(id(node))
        for name in node.input:
            if name and name not in needed:
                needed.add(name)
                stack.append(name)
    return [n for n in nodes if id(n) in live]


@dataclass(frozen=True)
class FusedCheck:
    """The fused graph's logits against the graph it was made from, over prefills and ragged decode steps."""

    steps: int
    max_abs_error: float
    min_cosine: float
    failure: str | None  # None: passed

    def summary(self) -> str:
        verdict = "pass" if self.failure is None else f"FAIL: {self.failure}"
        return f"in-place KV vs appended: max|err| {self.max_abs_error:.2e}, cos >= {self.min_cosine:.6f} over {self.steps} steps: {verdict}"


def check_fused(reference: Path, fused: Path, facts: ModelFacts, atol: float, rtol: float,
                min_cosine: float | None) -> FusedCheck:
    """Both graphs through the server's runner (one at a time: a large model's weights are held once): two prompts
    of different lengths prefilled, then decoded together for a few steps on the same tokens. ``min_cosine`` (FP16
    graphs) gates by cosine; otherwise every logit must be ``allclose(atol, rtol)``."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, facts.vocab_size, n) for n in (5, 11)]
    fed = rng.integers(0, facts.vocab_size, (_DECODE_STEPS, len(prompts)))
    runs = [_logits(path, facts, prompts, fed) for path in (reference, fused)]
    worst, cosine, failure = 0.0, 1.0, None
    for expected, got in zip(*runs):
        error = float(np.abs(got - expected).max())
        similarity = float(np.dot(got.ravel(), expected.ravel()) /
                           max(np.linalg.norm(got) * np.linalg.norm(expected), 1e-30))
        worst, cosine = max(worst, error), min(cosine, similarity)
        if failure is None and min_cosine is None and not np.allclose(got, expected, atol=atol, rtol=rtol):
            failure = f"logits differ beyond atol {atol:g} / rtol {rtol:g} (max|err| {error:.2e})"
        if failure is None and min_cosine is not None and similarity < min_cosine:
            failure = f"logits' cosine {similarity:.6f} < {min_cosine}"
    return FusedCheck(len(runs[0]), worst, cosine, failure)


_DECODE_STEPS = 3


def _logits(path: Path, facts: ModelFacts, prompts: list[np.ndarray], fed: np.ndarray) -> list[np.ndarray]:
    runner = LanguageModelRunner(str(path), facts)
    params = SamplingParams(max_tokens=_DECODE_STEPS + 1)
    sequences = [runner.start(p, np.zeros((p.size, facts.hidden_size), np.float32), np.zeros(p.size, bool), params)
                 for p in prompts]
    out = [s.logits.copy() for s in sequences]
    for tokens in fed:
        for seq, token in zip(sequences, tokens):
            seq.tokens.append(int(token))
        runner.decode(sequences)
        out.append(np.stack([s.logits for s in sequences]))
    return out
