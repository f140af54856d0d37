"""FP16 (mixed-precision) ONNX for a strongly typed TensorRT build.

``onnxruntime.transformers.float16`` (the converter of onnxconverter-common, shipped inside
onnxruntime: no extra dependency) casts weights and compute to FP16 and keeps the graph's inputs
and outputs FP32, so the Triton configs and the serving code stay the same; ops that are unsafe in
FP16 (the converter's default block list, e.g. Range, Resize) stay FP32 behind Casts.
"""

from __future__ import annotations

from pathlib import Path

from onnxruntime.transformers.float16 import convert_float_to_float16

from builder.onnx_files import load_onnx, save_onnx


def convert_fp16(fp32: Path, output: Path) -> None:
    save_onnx(convert_float_to_float16(load_onnx(fp32), keep_io_types=True, disable_shape_infer=True), output)
