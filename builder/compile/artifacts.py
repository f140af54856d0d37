"""What the compile stage hands to the repository stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from builder.export.onnx_export import ExportedGraph


@dataclass(frozen=True)
class CompiledModel:
    component: str
    path: Path  # the file Triton (or the Python model) loads: model.onnx, or a TensorRT plan
    precision: str
    graph: ExportedGraph  # the ONNX graph it was compiled from: its signature and parity figures
