"""What the compile stage hands to the repository stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.compile.plans import PlanRecord, cc_model_filenames
from builder.export.graph import ExportedGraph
from builder.onnx_files import graph_files
from builder.quantize.ladder import Settled


@dataclass(frozen=True)
class CompiledModel:
    component: str
    path: Path  # the file Triton (or the Python model) loads here: model.onnx, or this GPU's TensorRT plan
    precision: str
    graph: ExportedGraph  # the ONNX graph it was compiled from: its signature and parity figures
    plans: tuple[PlanRecord, ...] = ()  # target tensorrt: this build's plan first, then other GPUs' carried plans
    quantization: Settled | None = None  # how the quantize stage got this graph: method, gate figures, fallbacks
    kv_cache: str | None = None  # the LLM: how the served graph holds its KV cache, and why or how well (one line)

    @property
    def files(self) -> dict[str, Path]:
        """Version-directory file name -> source."""
        return {p.file: p.path for p in self.plans} if self.plans else {"model.onnx": self.path}

    @property
    def bytes(self) -> int:
        """What the model weighs on disk: this build's plan, or the graph with its external data."""
        return self.path.stat().st_size if self.plans else sum(f.stat().st_size for f in graph_files(self.path))

    @property
    def cc_model_filenames(self) -> dict[str, str]:
        return cc_model_filenames(self.plans)

    def manifest_extra(self) -> dict[str, Any]:
        return {**({"plans": [p.to_json() for p in self.plans]} if self.plans else {}),
                **({"kv_cache": self.kv_cache} if self.kv_cache else {})}

