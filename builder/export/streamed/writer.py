"""Writes the stamped LLM graph: each weight read from the shards, converted or quantized, appended to the
external data file and dropped, in graph order (layer after layer).

The largest transient is one tensor: its stored bytes, their FP32 (or FP16) copy, the transposed copy a MatMul
reads, and (INT8/INT4) its quantized bytes. Nothing holds a second weight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

from builder.errors import BuildError
from builder.export.streamed.checkpoint import CheckpointTensors
from builder.export.streamed.stamp import StampedGraph, stamp
from builder.export.streamed.template import empty_model, export_template, model_class
from builder.quantize.weight_only import dequantized_weight, nbits_config
from builder.spec import LimitsSpec

Precision = Literal["fp32", "fp16", "int8", "int4"]
WeightForm = Literal["matmul_nbits", "qdq"]  # ONNX Runtime's contrib op, or DequantizeLinear for TensorRT
_ALIGN, _ALIGN_FROM = 65536, 1 << 20  # large tensors start on a page multiple, so ONNX Runtime can map them


@dataclass(frozen=True)
class StreamedLlm:
    path: Path  # model.onnx; its weights in ``model.onnx.data`` beside it
    precision: Precision
    weight_form: WeightForm | None  # integer precisions only
    num_layers: int
    data_bytes: int
    seconds: float

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


def write_streamed_llm(checkpoint: Path, output: Path, precision: Precision = "fp32", *, limits: LimitsSpec,
                       opset: int = 20, block_size: int | None = 32, accuracy_level: int = 4,
                       weight_form: WeightForm = "matmul_nbits") -> StreamedLlm:
    """The checkpoint's LLM graph in ``output/model.onnx`` (+ ``model.onnx.data``), with the inputs and outputs of
    the whole-model export (:func:`builder.export.recipes.llm_recipe`), written one weight at a time.

    ``precision``: fp32 / fp16 weights (and KV cache: fp16 for fp16), or int8 / int4 weight-only on an FP32 graph in
    ``weight_form``: ``MatMulNBits`` (``block_size``, ``accuracy_level`` as :func:`builder.quantize.weight_only.
    quantize_weights_nbits`) or, for TensorRT, ``DequantizeLinear`` weights (opset 21; ``block_size`` None: per
    output channel) as :func:`builder.quantize.weight_only.quantize_weights_qdq` writes them.
    """
    started = time.perf_counter()
    if weight_form == "matmul_nbits" and block_size is None and precision in ("int8", "int4"):
        raise BuildError("llm: MatMulNBits needs a block size")
    if weight_form == "qdq":
        opset = max(opset, 21)  # blocked and int4 DequantizeLinear
    template = export_template(checkpoint, "float16" if precision == "fp16" else "float32", limits, opset)
    graph = stamp(template)
    output.mkdir(parents=True, exist_ok=True)
    path = output / "model.onnx"
    data = path.with_name(path.name + ".data")
    config = model_class(checkpoint).config_class.from_pretrained(checkpoint)
    tensors = CheckpointTensors(checkpoint, empty_model(checkpoint, config, None, None))
    bits = {"int8": 8, "int4": 4}.get(precision)
    with data.open("wb") as handle:
        external = ExternalData(handle, data.name)
        nodes, initializers = _write_weights(graph, tensors, external, precision, bits, weight_form, block_size, accuracy_level)
        data_bytes = external.offset
    opsets = list(template.model.opset_import)
    if bits is not None and weight_form == "matmul_nbits":
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    body = helper.make_graph(nodes, "llm", graph.inputs, graph.outputs, [*graph.constants, *initializers])
    model = helper.make_model(body, opset_imports=opsets, ir_version=template.model.ir_version,
                              producer_name="builder.export.streamed")
    onnx.save_model(model, str(path))
    return StreamedLlm(path, precision, weight_form if bits else None, template.facts.num_layers, data_bytes,
                       time.perf_counter() - started)


def _write_weights(graph: StampedGraph, tensors: CheckpointTensors, external: ExternalData, precision: Precision,
                   bits: int | None, weight_form: WeightForm, block_size: int | None, accuracy_level: int
                   ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The graph's nodes with each weight's Transpose folded and its MatMuls quantized, and the initializers
    (external) in the order the nodes first read them."""
    float_type = torch.float16 if precision == "fp16" else torch.float32
    transposed: dict[str, str] = {}  # Transpose output -> the weight it transposes
    for node in graph.nodes:
        if node.op_type == "Transpose" and node.input[0] in graph.weights:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
            if perm != [1, 0]:
                raise BuildError(f"llm: weight {node.input[0]} is transposed by {perm}, not [1, 0]")
            transposed[node.output[0]] = node.input[0]
    quantizer = DefaultWeightOnlyQuantizer(nbits_config(block_size or 0, accuracy_level, bits)) \
        if bits and weight_form == "matmul_nbits" else None
    written: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []

    def weight(name: str) -> np.ndarray:
        """The weight (or, for a Transpose output, the weight transposed) as a float array."""
        source = transposed.get(name, name)
        array = tensors.read(graph.weights[source]).to(float_type).numpy()
        return np.ascontiguousarray(array.T) if name in transposed else array

    for node in graph.nodes:
        if node.op_type == "Transpose" and node.output[0] in transposed:
            continue  # folded: its output is written transposed
        if bits and node.op_type == "MatMul" and node.input[1] in transposed:
            array = weight(node.input[1])
            if quantizer is not None:
                scratch = onnx.GraphProto(initializer=[numpy_helper.from_array(array, node.input[1])])
                del array
                nodes += quantizer.quantize(node, [scratch])
                initializers += [external.moved(t) for t in scratch.initializer if t.name != node.input[1]]
            else:
                produced, dequantize = dequantized_weight(node.input[1], array, block_size, bits)
                del array
                initializers += [external.moved(t) for t in produced]
                node.input[1] = dequantize.output[0]
                nodes += [dequantize, node]
            continue
        for name in node.input:
            if name and name not in written and (name in graph.weights or name in transposed):
                initializers.append(external.array(name, weight(name)))
                written.add(name)
        nodes.append(node)
    return nodes, initializers
