"""Target ``python`` (default, runs anywhere): every graph is run by ONNX Runtime inside the
repository's Python models; encoders are not batched across requests."""

from __future__ import annotations

from builder.targets.base import Target

PYTHON = Target("python", "ONNX graphs run by ONNX Runtime in Triton's Python backend (any machine)")
