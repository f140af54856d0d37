"""Static INT8 with Q/DQ nodes (ONNX Runtime's ``quantize_static``) from one cached calibration pass,
in the layout a target names: ``U8S8`` (asymmetric uint8 activations, per-channel int8 weights: ORT's
fast x86 kernels) or ``S8S8`` (symmetric, what TensorRT builds INT8 engines from). Only the
Conv/MatMul/Gemm nodes that multiply by a weight are quantized (README, "INT8 and FP16", says why).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

from builder.onnx_files import data_files

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
}


@dataclass(frozen=True)
class QdqLayout:
    name: str
    activation_type: QuantType
    symmetric_activations: bool
    op_types: tuple[str, ...] = ("Conv", "MatMul", "Gemm")


U8S8 = QdqLayout("U8S8", QuantType.QUInt8, symmetric_activations=False)
S8S8 = QdqLayout("S8S8", QuantType.QInt8, symmetric_activations=True)
LAYOUTS = {layout.name: layout for layout in (U8S8, S8S8)}  # named by builder.targets


def calibrate(fp32: Path, reader: CalibrationDataReader, method: str, ranges: Path) -> None:
    """The one calibration pass: tensor ranges of every Conv/MatMul/Gemm input and output, as JSON.
    Every layout, and every rung of the ladder that uses ``method``, quantizes from this file."""
    with tempfile.TemporaryDirectory(prefix="calibrate.") as tmp, _quiet():
        calibrator = create_calibrator(
            fp32, list(U8S8.op_types), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CALIBRATION_METHODS[method], providers=["CPUExecutionProvider"],
        )
        # One sample per call: images keep their own sizes, and ORT's histogram collectors stack a call's
        # samples into one array; ranges and histograms are merged across calls.
        while (sample := reader.get_next()) is not None:
            calibrator.collect_data(_OneSample(sample))
        save_tensors_data(calibrator.compute_data(), ranges)


class _OneSample(CalibrationDataReader):
    def __init__(self, sample: dict) -> None:
        self.sample: dict | None = sample

    def get_next(self) -> dict | None:
        sample, self.sample = self.sample, None
        return sample


def quantize_qdq(fp32: Path, output: Path, layout: QdqLayout, method: str, ranges: Path, exclude: Sequence[str] = ()) -> None:
    """Writes the Q/DQ graph of ``layout`` to ``output`` from the ranges :func:`calibrate` wrote."""
    skip = set(exclude)
    nodes = [name for name in weight_nodes(fp32, layout.op_types) if name not in skip]
    with _quiet():
        quantize_static(
            str(fp32), str(output), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(layout.op_types),
            nodes_to_quantize=nodes, per_channel=True, activation_type=layout.activation_type, weight_type=QuantType.QInt8,
            calibrate_method=CALIBRATION_METHODS[method], calibration_cache_path=str(ranges),
            extra_options={"ActivationSymmetric": layout.symmetric_activations, "WeightSymmetric": True},
            use_external_data_format=bool(data_files(fp32)),  # written as <output>.data, as onnx_files expects
        )


def weight_nodes(path: Path, op_types: Sequence[str]) -> list[str]:
    """Names of the ``op_types`` nodes whose second input is a weight (an initializer)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return [node.name for node in graph.node if node.op_type in op_types and node.input[1] in weights]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizer logs advice ("consider pre-processing") on the root logger at every call, and its
    histogram calibrators print progress lines of their own; our progress bars say enough."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
