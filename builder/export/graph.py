"""What an exported graph is, for the stages after export: its file, its signature, its parity record.

Light on purpose (onnx only, no torch): every later stage and the no-op build read these.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx


@dataclass(frozen=True)
class ParityResult:
    samples: int
    max_abs_error: float
    min_cosine: float
    atol: float | None  # FP32 graphs: every output allclose(atol, rtol)
    rtol: float | None
    cosine_gate: float | None = None  # FP16 graphs: every output's cosine at least this
    dtype: str = "float32"

    def summary(self) -> str:
        return f"{self.dtype}: max|err| {self.max_abs_error:.2e}, cos >= {self.min_cosine:.6f} over {self.samples} inputs"


_ELEM_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.INT8: "TYPE_INT8",
}


@dataclass(frozen=True)
class TensorSig:
    name: str
    data_type: str  # Triton's name (TYPE_FP32...)
    dims: tuple[int, ...]  # -1 for dynamic axes


@dataclass(frozen=True)
class AttentionLayout:
    """How an LLM graph's layers attend, beyond what its signature says: what fusing each layer's attention into
    ONNX Runtime's GroupQueryAttention needs (``builder.compile.ort_llm_graph``). ``windows``: per layer, the
    positions a query sees (itself included) when the layer slides, 0 when it sees every earlier one."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    windows: tuple[int, ...]


@dataclass(frozen=True)
class ExportedGraph:
    """``path`` and ``parity`` are None for an LLM served in INT8 or INT4: its FP32 graph is never written (a 24B
    model's is 96 GB); the quantize stage writes each candidate from the checkpoint's shards and gates it against
    the checkpoint in PyTorch, which is its parity check."""

    component: str
    path: Path | None
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]
    parity: ParityResult | None
    # the LLM's, when its attention is causal self-attention over the cache, plus a sliding window at most (None:
    # an encoder, or a decoder that attends otherwise, e.g. Gemma 3's image tokens both ways)
    attention: AttentionLayout | None = None

    def output(self, name: str) -> TensorSig:
        return next(sig for sig in self.outputs if sig.name == name)


def graph_signature(path: Path) -> tuple[tuple[TensorSig, ...], tuple[TensorSig, ...]]:
    model = onnx.load(str(path), load_external_data=False)
    return signature(model.graph.input, model.graph.output)


def signature(inputs: Iterable[onnx.ValueInfoProto], outputs: Iterable[onnx.ValueInfoProto]) -> tuple[tuple[TensorSig, ...], tuple[TensorSig, ...]]:
    def sig(value: onnx.ValueInfoProto) -> TensorSig:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        return TensorSig(value.name, _ELEM_TYPES.get(tensor.elem_type, f"onnx:{tensor.elem_type}"), dims)

    return tuple(map(sig, inputs)), tuple(map(sig, outputs))


def load_exported(directory: Path) -> ExportedGraph:
    raw = json.loads((directory / "export.json").read_text())
    path = directory / "model.onnx"
    return ExportedGraph(
        component=raw["component"],
        path=path if path.exists() else None,
        inputs=tuple(TensorSig(s["name"], s["data_type"], tuple(s["dims"])) for s in raw["inputs"]),
        outputs=tuple(TensorSig(s["name"], s["data_type"], tuple(s["dims"])) for s in raw["outputs"]),
        parity=ParityResult(**raw["parity"]) if raw["parity"] else None,
        attention=(AttentionLayout(**{**raw["attention"], "windows": tuple(raw["attention"]["windows"])})
                   if raw.get("attention") else None),
    )


def to_json(graph: ExportedGraph) -> dict:
    data = asdict(graph)
    data.pop("path")
    return data
