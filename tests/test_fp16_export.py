"""precision fp16: each component exported straight in FP16 (no FP32 graph in between), checked against
PyTorch in FP16, served with an FP16 KV cache, and answering like the FP32 build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from builder.build import build
from builder.serve.client import Request, ask, ask_stream
from builder.spec import load_spec
from builder.onnx_files import load_onnx
from tests.conftest import CACHE, ROOT, png_bytes
from tests.test_quantize import pipeline_figures, served_graphs

FP16 = {f"components.{c}.precision": "fp16" for c in ("vision", "audio", "llm")}
KV_TYPES = {onnx.TensorProto.FLOAT16}


@pytest.fixture(scope="module")
def fp16_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("fp16") / "repo"
    build(load_spec(ROOT / "specs" / "tiny.yaml", FP16), output, CACHE, progress=False)
    return output


def test_every_graph_is_fp16_inside_and_fp32_at_its_edges(fp16_repository: Path) -> None:
    components = json.loads((fp16_repository / "manifest.json").read_text())["components"]
    spec = load_spec(ROOT / "specs" / "tiny.yaml")
    for name, path in served_graphs(fp16_repository).items():
        entry = components[name]
        assert entry["precision"] == "fp16" and entry["quantization"]["attempts"] == []  # served as exported
        parity = entry["parity"]
        assert parity["dtype"] == "float16" and parity["min_cosine"] >= parity["cosine_gate"] == spec.export.fp16_min_cosine
        graph = load_onnx(path)
        weights = [w for w in graph.graph.initializer if w.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
        fp16_bytes = sum(len(w.raw_data) for w in weights if w.data_type == onnx.TensorProto.FLOAT16)
        assert fp16_bytes > 0.9 * sum(len(w.raw_data) for w in weights), name  # not an FP32 graph behind casts
        for value in (*graph.graph.input, *graph.graph.output):
            kv = value.name.startswith(("past_key_values.", "present."))
            elem = value.type.tensor_type.elem_type
            if kv:
                assert elem in KV_TYPES, value.name
            else:
                assert elem != onnx.TensorProto.FLOAT16, f"{name}: {value.name} should stay FP32 at the graph's edge"


def test_fp16_pipeline_agrees_with_fp32(fp16_repository: Path, built_repository: Path) -> None:
    """FP16 is not gated by the pipeline gate (nothing is quantized), but it holds it: same held-out requests."""
    figures = pipeline_figures(built_repository, fp16_repository)
    print(f"FP16 vs FP32 pipeline: {figures.summary()}")
    assert figures.passed, figures.summary()


@pytest.mark.serving
def test_fp16_repository_serves_unary_and_streaming_alike(fp16_repository: Path, tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient

    from builder.serve.tritonserver import TritonServer

    request = Request("Describe the picture.", images=(png_bytes(3, (80, 56)),), max_tokens=12)
    with (TritonServer(fp16_repository, log_path=tmp_path / "tritonserver.log") as server,
          grpcclient.InferenceServerClient(server.grpc_url) as client):
        unary = ask(client, request).token_ids
        streamed = [t for _, ids in ask_stream(client, request) for t in ids]
    assert len(unary) > 0 and streamed == unary
    assert np.unique(unary).size > 1, unary  # a working decoder, not one token repeated
