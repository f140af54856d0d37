"""The LLM in INT8 or INT4, weight-only and block-wise: ONNX Runtime's ``MatMulNBits`` (bits 8 or 4, round to
nearest), or for TensorRT, which cannot parse that contrib op, int8 / int4 ``DequantizeLinear`` weights (per output
channel, or blocked with opset 21's ``block_size``) feeding each MatMul, gated here under ORT. Decode is
memory-bound, so weight bytes are what count; the lm_head is quantized like every MatMul, the embedding table is
FP16 (a lookup), attention math stays float.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from builder.errors import BuildError
from builder.export.streamed.writer import LinearWeight, half_lookup, matmul_of_gemm
from builder.onnx_files import load_onnx, save_onnx

if TYPE_CHECKING:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig


def quantize_weights_nbits(fp32: Path, output: Path, block_size: int, accuracy_level: int = 4, bits: int = 8) -> None:
    """``accuracy_level`` 4 lets ONNX Runtime's CPU kernel multiply in int8 (activations quantized on
    the fly): measured here about 10x faster than level 0, which dequantizes to float and ran slower
    than the FP32 MatMul; level 0 is the more accurate fallback rung. ``bits``: 8 or 4."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    config = nbits_config(block_size, accuracy_level, bits)
    quantizer = MatMulNBitsQuantizer(integer_layout(load_onnx(fp32)), bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, algo_config=config)
    quantizer.process()
    save_onnx(quantizer.model.model, output)


def integer_layout(model: onnx.ModelProto) -> onnx.ModelProto:
    """A whole FP32 graph laid out as the streamed writer lays out an integer-weight one: the lm_head's Gemm as a
    MatMul by its transposed weight (so it is quantized too), the embedding table in FP16."""
    weights = {t.name: t for t in model.graph.initializer}
    added, nodes = [], []
    for node in model.graph.node:
        matmul = matmul_of_gemm(node) if node.op_type == "Gemm" and node.input[1] in weights else None
        if matmul is not None:
            added.append(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weights[node.input[1]]).T),
                                                 matmul.input[1]))
            nodes.append(matmul)
        elif node.op_type == "Gather" and node.input[0] in weights and weights[node.input[0]].data_type == onnx.TensorProto.FLOAT:
            added.append(numpy_helper.from_array(numpy_helper.to_array(weights[node.input[0]]).astype(np.float16),
                                                 f"{node.input[0]}_fp16"))
            nodes += half_lookup(node)
        else:
            nodes.append(node)
    read = {name for node in nodes for name in node.input}
    kept = [t for t in [*model.graph.initializer, *added] if t.name in read]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(kept)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return model


def nbits_config(block_size: int, accuracy_level: int = 4, bits: int = 8) -> DefaultWeightOnlyQuantConfig:
    """The ``MatMulNBits`` form every INT8/INT4 ONNX Runtime LLM here has: symmetric, round to nearest, MatMul only
    (a whole graph through ``quantize_weights_nbits``, or one weight at a time through ORT's
    ``DefaultWeightOnlyQuantizer(config).quantize``)."""
    # Imported here: it pulls in sympy (about a second), which the CLI's --help and a no-op build should not wait for.
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    # Importing that module calls logging.basicConfig(level=INFO): every library's INFO lines would print.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    return DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, bits=bits, accuracy_level=accuracy_level, quant_format=QuantFormat.QOperator,
        op_types_to_quantize=("MatMul",),
    )


def quantize_weights_qdq(fp32: Path, output: Path, block_size: int | None, bits: int = 8) -> None:
    """Each MatMul by a 2-D float weight [K, N] reads DequantizeLinear(int8 or int4 [K, N], scales): symmetric, one
    scale per output column (``block_size`` None: scales [N], axis 1) or per ``block_size`` weights along K
    (scales [K / block, N], axis 0, as ``MatMulNBits`` blocks them)."""
    model = onnx.version_converter.convert_version(integer_layout(load_onnx(fp32)), 21)  # blocked DequantizeLinear
    weights = {init.name: init for init in model.graph.initializer}
    dequantize = []
    for node in model.graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
            continue
        model.graph.initializer.remove(weight)
        tensors, node_dq = dequantized_weight(weight.name, numpy_helper.to_array(weight), block_size, bits)
        model.graph.initializer.extend(tensors)
        dequantize.append(node_dq)
        node.input[1] = node_dq.output[0]
    nodes = [*dequantize, *model.graph.node]  # the weights' dequantization first: a topological order
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    save_onnx(model, output)


def dequantized_weight(name: str, weight: np.ndarray, block_size: int | None, bits: int
                       ) -> tuple[list[onnx.TensorProto], onnx.NodeProto]:
    """One float weight [K, N] as int8 / int4 values + scales and the DequantizeLinear node giving it back
    (output ``<name>_dequantized``), in the layout :func:`quantize_weights_qdq` documents."""
    return _dequantize_linear(name, *_blockwise(weight, block_size or weight.shape[0], bits), block_size, bits)


def _dequantize_linear(name: str, values: np.ndarray, scales: np.ndarray, block_size: int | None, bits: int
                       ) -> tuple[list[onnx.TensorProto], onnx.NodeProto]:
    layout = {"axis": 0, "block_size": block_size} if block_size else {"axis": 1}
    quantized = f"{name}_int{bits}"
    tensors = [_integer_tensor(quantized, values, bits), numpy_helper.from_array(scales if block_size else scales[0], f"{name}_scale")]
    node = helper.make_node("DequantizeLinear", [quantized, f"{name}_scale"], [f"{name}_dequantized"],
                            name=f"{name}_DequantizeLinear", **layout)
    return tensors, node


def _blockwise(weight: np.ndarray, block_size: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = weight.shape
    blocks = -(-rows // block_size)
    padded = np.zeros((blocks * block_size, cols), np.float32)
    padded[:rows] = weight
    grouped = padded.reshape(blocks, block_size, cols)
    most = 2 ** (bits - 1) - 1  # symmetric: 127 or 7
    scales = np.abs(grouped).max(axis=1) / most
    scales[scales == 0] = 1.0  # an all-zero block: any scale reproduces it
    values = np.clip(np.round(grouped / scales[:, None, :]), -most, most).astype(np.int8).reshape(-1, cols)[:rows]
    return np.ascontiguousarray(values), scales.astype(np.float32)


def _integer_tensor(name: str, values: np.ndarray, bits: int) -> onnx.TensorProto:
    """int8 values as an INT8 initializer, or as INT4 packed two to a byte (the first in the low nibble, as ONNX
    stores int4), both as raw bytes."""
    if bits == 8:
        return numpy_helper.from_array(values, name)
    flat = values.reshape(-1).astype(np.uint8) & 0x0F
    flat = np.append(flat, np.uint8(0)) if flat.size % 2 else flat
    packed = flat[0::2] | (flat[1::2] << 4)
    return helper.make_tensor(name, onnx.TensorProto.INT4, values.shape, packed.tobytes(), raw=True)


@dataclass(frozen=True)
class NbitsWeights:
    """``MatMulNBits`` weights one MatMul at a time (the streamed LLM writer's ``weights``), as
    :func:`quantize_weights_nbits` writes them for a whole graph."""

    bits: int
    block_size: int
    accuracy_level: int = 4
    opset: int = 0
    domains: tuple[str, ...] = ("com.microsoft",)
    packs_siblings: ClassVar[bool] = True  # columns are quantized independently: side by side is the same
    # ORT's quantizer reads a weight from a protobuf graph, which holds under 2 GB, and copies it a few times: a
    # large one (a 131k-token lm_head) is quantized this many bytes of FP32 columns at a time (a decoder layer's
    # matrices, under it, in one piece).
    chunk_bytes: int = 1 << 28

    @property
    def precision(self) -> str:
        return f"int{self.bits}"

    def matmul(self, node: onnx.NodeProto, weight: LinearWeight) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

        quantizer = DefaultWeightOnlyQuantizer(nbits_config(self.block_size, self.accuracy_level, self.bits))
        chunks: list[list[onnx.TensorProto]] = []
        for part in weight.chunks(self.chunk_bytes):
            scratch = onnx.GraphProto(initializer=[numpy_helper.from_array(part, node.input[1])])
            del part  # the scratch graph holds the copy ORT's quantizer reads
            nodes = quantizer.quantize(node, [scratch])
            chunks.append([t for t in scratch.initializer if t.name != node.input[1]])
        if len(chunks) == 1:
            return nodes, chunks[0]
        # MatMulNBits' weights [N, blocks, bytes] and scales [N * blocks] are laid out column by column.
        merged = [numpy_helper.from_array(np.concatenate([numpy_helper.to_array(chunk[i]) for chunk in chunks]),
                                          first.name) for i, first in enumerate(chunks[0])]
        for made in nodes:
            for attribute in made.attribute:
                if made.op_type == "MatMulNBits" and attribute.name == "N":
                    attribute.i = weight.shape[1]
        return nodes, merged


@dataclass(frozen=True)
class QdqWeights:
    """``DequantizeLinear`` weights one MatMul at a time (for TensorRT), as :func:`quantize_weights_qdq` writes them;
    ``block_size`` None: per output channel."""

    bits: int
    block_size: int | None
    opset: int = 21  # blocked and int4 DequantizeLinear
    domains: tuple[str, ...] = ()
    packs_siblings: ClassVar[bool] = True
    chunk_bytes: int = 1 << 28  # of FP32 columns converted at a time

    @property
    def precision(self) -> str:
        return f"int{self.bits}"

    def matmul(self, node: onnx.NodeProto, weight: LinearWeight) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        parts = [_blockwise(part, self.block_size or weight.shape[0], self.bits) for part in weight.chunks(self.chunk_bytes)]
        values, scales = (np.concatenate(part, axis=1) for part in zip(*parts, strict=True))
        del parts
        produced, dequantize = _dequantize_linear(node.input[1], values, scales, self.block_size, self.bits)
        node.input[1] = dequantize.output[0]
        return [dequantize, node], produced


@dataclass(frozen=True)
class ScaledWeights:
    """AWQ's form (:mod:`builder.quantize.awq`): each decoder MatMul's weight scaled per input channel by its searched
    ``s`` before ``inner`` quantizes it, and its input divided by ``s`` (a Mul before the MatMul), so the product is
    the checkpoint's while the channels the activations use most round finest. The lm_head has no scales: ``inner``
    alone. ``scales``: the search's .npz, HF weight name -> ``s`` [K]."""

    inner: NbitsWeights | QdqWeights
    scales: Path
    packs_siblings: ClassVar[bool] = False  # each Linear's input divided by its own scales

    @property
    def precision(self) -> str:
        return self.inner.precision

    @property
    def opset(self) -> int:
        return self.inner.opset

    @property
    def domains(self) -> tuple[str, ...]:
        return self.inner.domains

    @cached_property
    def _found(self) -> dict[str, np.ndarray]:
        with np.load(self.scales) as archive:
            return {name: archive[name] for name in archive.files}

    def matmul(self, node: onnx.NodeProto, weight: LinearWeight) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        import torch

        name = next((n for n in weight.names if n in self._found), None)
        if name is None:
            if any(".layers." in n for n in weight.names):
                raise BuildError(f"llm: no AWQ scales for {weight.names[0]} in {self.scales}")
            return self.inner.matmul(node, weight)  # the lm_head
        scales = self._found[name]
        scaled = LinearWeight(weight.stored.to(torch.float32) * torch.from_numpy(scales)[None, :], weight.names)
        inverse = numpy_helper.from_array((1 / scales).astype(np.float32), f"{node.input[1]}_awq_inverse")
        divided = helper.make_node("Mul", [node.input[0], inverse.name], [f"{node.input[1]}_awq_input"],
                                   name=f"{node.name}_awq")
        node.input[0] = divided.output[0]
        nodes, tensors = self.inner.matmul(node, scaled)
        return [divided, *nodes], [inverse, *tensors]
