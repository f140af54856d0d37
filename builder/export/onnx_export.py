"""The export stage: each component to ONNX with dynamic axes, checked against PyTorch."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch

from builder.errors import BuildError
from builder.export.parity import ParityResult, check_parity
from builder.export.precision import ExportDtype, cast_weights
from builder.export.recipes import ExportRecipe
from builder.onnx_files import EXTERNAL_DATA_THRESHOLD
from builder.spec import ExportSpec

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
class ExportedGraph:
    component: str
    path: Path
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]
    parity: ParityResult

    def output(self, name: str) -> TensorSig:
        return next(sig for sig in self.outputs if sig.name == name)


def graph_signature(path: Path) -> tuple[tuple[TensorSig, ...], tuple[TensorSig, ...]]:
    model = onnx.load(str(path), load_external_data=False)

    def sig(value: onnx.ValueInfoProto) -> TensorSig:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        return TensorSig(value.name, _ELEM_TYPES.get(tensor.elem_type, f"onnx:{tensor.elem_type}"), dims)

    return tuple(map(sig, model.graph.input)), tuple(map(sig, model.graph.output))


def export_graph(recipe: ExportRecipe, directory: Path, spec: ExportSpec, dtype: ExportDtype = "float32") -> ExportedGraph:
    """Exports ``recipe`` in ``dtype`` into ``directory/model.onnx`` and records the parity check in ``export.json``."""
    path = directory / "model.onnx"
    cast_weights(recipe.module, dtype)
    example = recipe.sample_inputs(torch.Generator().manual_seed(0), 0)
    chatter = io.StringIO()
    for chatty in ("torch.onnx", "onnxscript", "onnx_ir"):  # "torchvision is not installed", constant-folding notes
        logging.getLogger(chatty).setLevel(logging.ERROR)
    try:
        # The exporter prints progress lines and warnings of its own; our progress bar says enough.
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                recipe.module, example, str(path), input_names=recipe.input_names, output_names=recipe.output_names,
                dynamic_shapes=_dynamic_shapes_by_position(recipe), opset_version=spec.opset, dynamo=True,
                external_data=_needs_external_data(recipe.module),
            )
    except Exception as exc:  # the exporter raises many types; all mean the same to the user
        raise BuildError(f"{recipe.component}: ONNX export failed: {str(exc).splitlines()[0]}") from exc
    cosine_gate = spec.fp16_min_cosine if dtype == "float16" else None
    parity = check_parity(recipe, path, spec.parity_samples, spec.atol, spec.rtol, cosine_gate=cosine_gate)
    inputs, outputs = graph_signature(path)
    exported = ExportedGraph(recipe.component, path, inputs, outputs, parity)
    (directory / "export.json").write_text(json.dumps(_to_json(exported), indent=2))
    return exported


def load_exported(directory: Path) -> ExportedGraph:
    raw = json.loads((directory / "export.json").read_text())
    return ExportedGraph(
        component=raw["component"],
        path=directory / "model.onnx",
        inputs=tuple(TensorSig(s["name"], s["data_type"], tuple(s["dims"])) for s in raw["inputs"]),
        outputs=tuple(TensorSig(s["name"], s["data_type"], tuple(s["dims"])) for s in raw["outputs"]),
        parity=ParityResult(**raw["parity"]),
    )


def _to_json(graph: ExportedGraph) -> dict:
    data = asdict(graph)
    data.pop("path")
    return data


def _dynamic_shapes_by_position(recipe: ExportRecipe) -> tuple:
    """torch.export wants dynamic shapes per forward() argument; ``past`` is the *args tuple."""
    named = [recipe.dynamic_shapes.get(name) for name in recipe.input_names if not name.startswith("past_key_values")]
    return (*named, recipe.dynamic_shapes["past"]) if "past" in recipe.dynamic_shapes else tuple(named)


def _needs_external_data(module: torch.nn.Module) -> bool:
    return sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_THRESHOLD
