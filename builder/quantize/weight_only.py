"""The LLM in INT8 or INT4, weight-only and block-wise: ONNX Runtime's ``MatMulNBits`` (bits 8 or 4, round to
nearest), or for TensorRT, which cannot parse that contrib op, int8 / int4 ``DequantizeLinear`` weights (per output
channel, or blocked with opset 21's ``block_size``) feeding each MatMul, gated here under ORT. Decode is
memory-bound, so weight bytes are what count; embeddings and attention math stay float.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantFormat
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

from builder.onnx_files import save_onnx

# Importing that module calls logging.basicConfig(level=INFO): every library's INFO lines would print.
logging.getLogger().setLevel(logging.WARNING)


def quantize_weights_nbits(fp32: Path, output: Path, block_size: int, accuracy_level: int = 4, bits: int = 8) -> None:
    """``accuracy_level`` 4 lets ONNX Runtime's CPU kernel multiply in int8 (activations quantized on
    the fly): measured here about 10x faster than level 0, which dequantizes to float and ran slower
    than the FP32 MatMul; level 0 is the more accurate fallback rung. ``bits``: 8 or 4."""
    config = nbits_config(block_size, accuracy_level, bits)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, algo_config=config)
    quantizer.process()
    save_onnx(quantizer.model.model, output)


def nbits_config(block_size: int, accuracy_level: int = 4, bits: int = 8) -> DefaultWeightOnlyQuantConfig:
    """The ``MatMulNBits`` form every INT8/INT4 ONNX Runtime LLM here has: symmetric, round to nearest, MatMul only
    (a whole graph through ``quantize_weights_nbits``, or one weight at a time through ORT's
    ``DefaultWeightOnlyQuantizer(config).quantize``)."""
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    return DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, bits=bits, accuracy_level=accuracy_level, quant_format=QuantFormat.QOperator,
        op_types_to_quantize=("MatMul",),
    )


def quantize_weights_qdq(fp32: Path, output: Path, block_size: int | None, bits: int = 8) -> None:
    """Each MatMul by a 2-D float weight [K, N] reads DequantizeLinear(int8 or int4 [K, N], scales): symmetric, one
    scale per output column (``block_size`` None: scales [N], axis 1) or per ``block_size`` weights along K
    (scales [K / block, N], axis 0, as ``MatMulNBits`` blocks them)."""
    model = onnx.version_converter.convert_version(onnx.load(str(fp32)), 21)  # blocked DequantizeLinear
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
    values, scales = _blockwise(weight, block_size or weight.shape[0], bits)
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
