"""Writes the stamped LLM graph: each weight read from the shards, converted or quantized, appended to the
external data file and dropped, in graph order (layer after layer).

The largest transient is one tensor: its stored bytes, their FP32 (or FP16) copy, the transposed copy a MatMul
reads (INT8/INT4: a chunk of its columns at a time, from the stored bytes), and its quantized bytes. Nothing holds a second weight.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from builder.errors import BuildError
from builder.export.graph import AttentionLayout
from builder.export.precision import ExportDtype
from builder.export.streamed.stamp import StampedGraph, stamp
from builder.export.streamed.template import export_template
from builder.families.shards import CheckpointTensors, empty_model, model_class
from builder.spec import LimitsSpec

_ALIGN, _ALIGN_FROM = 65536, 1 << 20  # large tensors start on a page multiple, so ONNX Runtime can map them


@dataclass(frozen=True)
class LinearWeight:
    """A MatMul's weight as the checkpoint stores the Linear's: ``stored`` [N, K] in the checkpoint's dtype. The
    MatMul multiplies by its transpose [K, N]; :meth:`chunks` gives that in FP32 a few columns at a time, so an
    integer form converts a chunk at a time and no FP32 copy of a whole weight (2 GB for a 131k-token lm_head) is
    made. Blocks of weights run along K, so columns are quantized independently."""

    stored: torch.Tensor
    names: tuple[str, ...] = ()  # the HF model's names of it (tied weights: several)

    @property
    def shape(self) -> tuple[int, int]:
        """The MatMul's [K, N]."""
        rows, columns = self.stored.shape
        return columns, rows

    def chunks(self, max_bytes: int) -> Iterator[np.ndarray]:
        """The MatMul's [K, N] weight in FP32, contiguous, ``max_bytes`` of columns at a time, left to right."""
        step = max(1, max_bytes // (self.stored.shape[1] * 4))
        for start in range(0, self.stored.shape[0], step):
            yield np.ascontiguousarray(self.stored[start:start + step].to(torch.float32).numpy().T)


class MatMulWeights(Protocol):
    """How each MatMul by a weight is written in an integer form (``builder.quantize.weight_only``'s): the nodes
    that replace it and the tensors they read."""

    precision: str  # int8 | int4
    opset: int  # the least ONNX opset its nodes need
    domains: tuple[str, ...]  # the operator sets beyond ONNX's its nodes use
    packs_siblings: bool  # Linears that read one input may be one MatMul (False: each changes its input its own way)

    def matmul(self, node: onnx.NodeProto, weight: LinearWeight) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]: ...


def matmul_of_gemm(node: onnx.NodeProto) -> onnx.NodeProto | None:
    """The lm_head's ``Gemm(x, W [N, K], transB=1)`` (how torch.onnx writes a 2-D Linear) as ``MatMul(x, W^T)``, the
    form the integer weights replace and the faster one in float (ONNX Runtime's CPU Gemm took ~18% longer on a
    32k x 768 lm_head), reading ``<W>_transposed``; None for any other Gemm (a bias, a scale)."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if (node.op_type != "Gemm" or len([i for i in node.input if i]) != 2 or attributes.get("transA", 0)
            or attributes.get("transB", 0) != 1 or attributes.get("alpha", 1.0) != 1.0):
        return None
    return helper.make_node("MatMul", [node.input[0], f"{node.input[1]}_transposed"], list(node.output), name=node.name)


def half_lookup(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """An integer-weight graph's embedding lookup: the table in FP16 (``<table>_fp16``, half the bytes of FP32; a lookup
    reads one row per token, so its precision costs memory, not speed), the rows cast back to FP32."""
    table = node.input[0]
    gather = onnx.NodeProto()
    gather.CopyFrom(node)
    gather.input[0], gather.output[0] = f"{table}_fp16", f"{node.output[0]}_fp16"
    cast = helper.make_node("Cast", [gather.output[0]], [node.output[0]], name=f"{node.name}_to_float",
                            to=onnx.TensorProto.FLOAT)
    return [gather, cast]


@dataclass(frozen=True)
class StreamedLlm:
    path: Path  # model.onnx; its weights in ``model.onnx.data`` beside it
    precision: str  # fp32 | fp16, or the MatMul weights' int8 | int4
    num_layers: int
    data_bytes: int
    seconds: float
    attention: AttentionLayout | None = None  # the family's wrapper's word on how its layers attend

    @property
    def data_path(self) -> Path:
        return self.path.with_name(self.path.name + ".data")


class ExternalData:
    """The graph's weight file, appended to tensor by tensor."""

    def __init__(self, handle: BinaryIO, location: str) -> None:
        self.handle, self.location, self.offset = handle, location, 0

    def tensor(self, name: str, data_type: int, dims: tuple[int, ...] | list[int], data: bytes | memoryview) -> onnx.TensorProto:
        if len(data) >= _ALIGN_FROM and self.offset % _ALIGN:
            padding = _ALIGN - self.offset % _ALIGN
            self.handle.write(b"\0" * padding)
            self.offset += padding
        self.handle.write(data)
        tensor = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(len(data)))):
            tensor.external_data.add(key=key, value=value)
        self.offset += len(data)
        return tensor

    def array(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        array = np.ascontiguousarray(array)
        return self.tensor(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape, memoryview(array).cast("B"))

    def moved(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """``tensor`` (raw bytes inside) with its bytes moved to the file."""
        if not tensor.HasField("raw_data"):
            tensor = numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name)
        return self.tensor(tensor.name, tensor.data_type, tensor.dims, tensor.raw_data)


def write_streamed_llm(checkpoint: Path, output: Path, dtype: ExportDtype = "float32", *, limits: LimitsSpec,
                       opset: int = 20, weights: MatMulWeights | None = None) -> StreamedLlm:
    """The checkpoint's LLM graph in ``output/model.onnx`` (+ ``model.onnx.data``), with the inputs and outputs of
    the whole-model export (:func:`builder.export.recipes.llm_recipe`), written one weight at a time.

    ``dtype``: of the weights and the KV cache (logits are FP32); ``weights``: the MatMuls' weights in an integer
    form instead (an FP32 graph otherwise), e.g. ``builder.quantize.weight_only.NbitsWeights``.
    """
    started = time.perf_counter()
    if weights is not None:
        if dtype != "float32":
            raise BuildError("llm: integer weights go into an FP32 graph")
        opset = max(opset, weights.opset)
    template = export_template(checkpoint, dtype, limits, opset)
    graph = stamp(template)
    output.mkdir(parents=True, exist_ok=True)
    path = output / "model.onnx"
    data = path.with_name(path.name + ".data")
    config = model_class(checkpoint).config_class.from_pretrained(checkpoint)
    tensors = CheckpointTensors(checkpoint, empty_model(model_class(checkpoint), config, None, None))
    with data.open("wb") as handle:
        external = ExternalData(handle, data.name)
        # GroupQueryAttention takes q, k and v packed when it computes the attention and rotates them itself: not
        # with M-RoPE's three position rows (builder.compile.ort_llm_graph.fuse_rotary leaves those to the graph)
        packs_qkv = template.attention is not None and template.facts.position_rows == 1
        nodes, initializers = _write_weights(graph, tensors, external, dtype, weights, packs_qkv)
        data_bytes = external.offset
    opsets = [*template.model.opset_import, *(helper.make_opsetid(d, 1) for d in (weights.domains if weights else ()))]
    constants = [*graph.constants, *initializers]
    nodes = topological(nodes, {v.name for v in graph.inputs} | {t.name for t in constants})
    body = helper.make_graph(nodes, "llm", graph.inputs, graph.outputs, constants)
    model = helper.make_model(body, opset_imports=opsets, ir_version=template.model.ir_version,
                              producer_name="builder.export.streamed")
    onnx.save_model(model, str(path))
    precision = weights.precision if weights else {"float32": "fp32", "float16": "fp16"}[dtype]
    return StreamedLlm(path, precision, template.facts.num_layers, data_bytes, time.perf_counter() - started,
                       template.attention)


def _write_weights(graph: StampedGraph, tensors: CheckpointTensors, external: ExternalData, dtype: ExportDtype,
                   weights: MatMulWeights | None, packs_qkv: bool,
                   ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The graph's nodes with each weight's Transpose folded, the lm_head's Gemm a MatMul (in float only when its
    weight is not also the embedding table: that would store it twice), q, k and v one MatMul when ``packs_qkv``
    (``builder.compile.ort_llm_graph`` will hand them to GroupQueryAttention so) and, given ``weights``, every
    MatMul's weights in their form and the embedding table in FP16; and the initializers (external) in the order the
    nodes first read them."""
    float_type = getattr(torch, dtype)
    transposed: dict[str, str] = {}  # Transpose output -> the weight it transposes
    for node in graph.nodes:
        if node.op_type == "Transpose" and node.input[0] in graph.weights:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
            if perm != [1, 0]:
                raise BuildError(f"llm: weight {node.input[0]} is transposed by {perm}, not [1, 0]")
            transposed[node.output[0]] = node.input[0]
    written: dict[tuple[str, bool], str] = {}  # (checkpoint key, transposed) -> its initializer: tied weights once
    plain_reads = Counter(tensors.key(graph.weights[name]) for node in graph.nodes if node.op_type != "Transpose"
                          for name in node.input if name in graph.weights)

    def tied(name: str) -> bool:
        """Another node reads this weight as it is stored (an embedding table tied to the lm_head)."""
        return plain_reads[tensors.key(graph.weights[name])] > 1

    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []

    def weight(name: str) -> np.ndarray:
        """The weight (or, for a Transpose output, the weight transposed) as a float array."""
        source = transposed.get(name, name)
        array = tensors.read(graph.weights[source]).to(float_type).numpy()
        return np.ascontiguousarray(array.T) if name in transposed else array

    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.nodes:
        for name in node.input:
            readers[name].append(node)

    def cut_into_heads(value: str) -> bool:
        """A Reshape alone reads ``value``."""
        return [r.op_type for r in readers[value]] == ["Reshape"]

    def bias_of(matmul: onnx.NodeProto) -> onnx.NodeProto | None:
        """The Add of a bias that alone reads the MatMul's output, itself cut into heads (Qwen's q, k, v)."""
        adds = readers[matmul.output[0]]
        if len(adds) != 1 or adds[0].op_type != "Add" or not any(name in graph.weights for name in adds[0].input):
            return None
        return adds[0] if cut_into_heads(adds[0].output[0]) else None

    def packed(group: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        """One MatMul by the group's weights side by side (and one Add of their biases), split back into their
        outputs (their biases' outputs)."""
        name = f"{group[0].output[0]}/packed"
        stored = [graph.weights[transposed[m.input[1]]] for m in group]
        matmul = helper.make_node("MatMul", [group[0].input[0], f"{name}/weight"], [name], name=name)
        sizes = numpy_helper.from_array(np.array([tensors.shape(n)[0] for n in stored], np.int64), f"{name}/sizes")
        initializers.append(sizes)
        adds = [bias_of(m) for m in group]
        added: list[onnx.NodeProto] = []
        if all(adds):
            biases = [next(i for i in add.input if i in graph.weights) for add in adds]
            added = [helper.make_node("Add", [name, f"{name}/bias"], [f"{name}/biased"], name=f"{name}/bias")]
            initializers.append(external.array(f"{name}/bias", np.concatenate([weight(b) for b in biases])))
        outputs = [add.output[0] for add in adds] if added else [m.output[0] for m in group]
        split_input = added[0].output[0] if added else name
        split = helper.make_node("Split", [split_input, sizes.name], outputs, name=f"{name}/split", axis=-1)
        if weights is None:
            initializers.append(external.array(matmul.input[1], np.concatenate([weight(m.input[1]) for m in group], axis=1)))
            return [matmul, *added, split]
        whole = LinearWeight(torch.cat([tensors.read(n) for n in stored]), tuple(n for names in stored for n in names))
        replaced, produced = weights.matmul(matmul, whole)
        del whole
        initializers.extend(external.moved(t) for t in produced)
        return [*replaced, *added, split]

    # q, k and v (Linears that read one input, each output cut into heads, a bias added or not) are written as one
    # MatMul: ONNX Runtime's GroupQueryAttention takes them packed so (builder.compile.ort_llm_graph.pack_qkv), one
    # kernel where there were three, and the Split goes. Elsewhere the Split would stay, and it copies what it cuts:
    # at decode that cost more than the kernel it saved (gate and up as one MatMul + Split was 2-4% slower per INT4
    # step than two MatMuls: benchmarks/genai_compare.py's 154M decoder, fresh processes alternated). AWQ's scales
    # change each Linear's input its own way: kept apart.
    siblings: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    if packs_qkv and (weights is None or weights.packs_siblings):
        for node in graph.nodes:
            if node.op_type == "MatMul" and node.input[1] in transposed and \
                    (cut_into_heads(node.output[0]) or bias_of(node) is not None):
                siblings[node.input[0]].append(node)
    packs = [group for group in siblings.values() if len(group) > 1 and len({bias_of(m) is None for m in group}) == 1]
    group_of = {id(m): group for group in packs for m in group}
    absorbed = {id(add) for group in packs for add in map(bias_of, group) if add is not None}

    for node in graph.nodes:
        if node.op_type == "Transpose" and node.output[0] in transposed:
            continue  # folded: its output is written transposed
        if id(node) in group_of:
            group = group_of[id(node)]
            nodes += packed(group) if node is group[0] else []
            continue
        if id(node) in absorbed:
            continue  # a bias added by its packed group's one Add
        if node.op_type == "Gemm" and node.input[1] in graph.weights and (weights is not None or not tied(node.input[1])):
            matmul = matmul_of_gemm(node)
            if matmul is not None:
                transposed[matmul.input[1]] = node.input[1]
                node = matmul
        if weights is not None and node.op_type == "MatMul" and node.input[1] in transposed:
            names = graph.weights[transposed[node.input[1]]]
            stored = LinearWeight(tensors.read(names), names)
            replaced, produced = weights.matmul(node, stored)
            del stored
            nodes += replaced
            initializers += [external.moved(t) for t in produced]
            continue
        if weights is not None and node.op_type == "Gather" and node.input[0] in graph.weights:
            table = tensors.read(graph.weights[node.input[0]]).to(torch.float16).numpy()
            nodes += half_lookup(node)
            initializers.append(external.array(f"{node.input[0]}_fp16", table))
            del table
            continue
        for index, name in enumerate(node.input):
            if name and (name in graph.weights or name in transposed):
                stored = (tensors.key(graph.weights[transposed.get(name, name)]), name in transposed)
                if stored not in written:
                    initializers.append(external.array(name, weight(name)))
                    written[stored] = name
                node.input[index] = written[stored]
        nodes.append(node)
    return nodes, initializers


def topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` each after the nodes making its inputs (ONNX requires it; TensorRT's parser relies on it), otherwise
    in their order: stamping hoists a layer's shared nodes ahead of the setup that feeds them."""
    available = set(available) | {""}  # an omitted optional input
    ordered: list[onnx.NodeProto] = []
    pending = list(nodes)
    while pending:
        waiting = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise BuildError(f"llm: the stamped graph reads {sorted(set(waiting[0].input) - available)[:3]}, "
                             "which no node makes")
        pending = waiting
    return ordered
