"""Shared fixtures: the default build, its PyTorch source, a real tritonserver serving it."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from builder.build import build
from builder.cache import StageCache
from builder.bench.baselines import load_preprocessor
from builder.runtime.preprocess import Preprocessor
from builder.source.checkpoint import SourceModel, load_checkpoint
from builder.source.resolve import resolve_source
from builder.spec import BuildSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".build_cache"
# CLI arguments for a build that needs a new repository but no new graph (only a config value changes).
REPOSITORY_CHANGE = ("--set", "triton.max_queue_delay_us=1999")


def tree_digest(root: Path) -> str:
    """Names and bytes of every file under ``root``: equal digests mean byte-for-byte equal trees."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m builder ARGS`` from the project root, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "builder", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_spec() -> BuildSpec:
    return load_spec(ROOT / "specs" / "tiny.yaml")


@pytest.fixture(scope="session")
def built_repository(tiny_spec: BuildSpec) -> Path:
    """The default build (a no-op when `make engines` already ran)."""
    output = ROOT / "model_repository"
    build(tiny_spec, output, CACHE, progress=False)
    return output


@pytest.fixture(scope="session")
def appended_llm(tiny_spec: BuildSpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's LLM graph as exported: each step's KV appended to the past and returned (the form the
    TensorRT target compiles); the repository serves the in-place form (builder.compile.ort_llm_graph)."""
    from builder.export.streamed.writer import write_streamed_llm

    checkpoint = resolve_source(tiny_spec.source, StageCache(CACHE)).checkpoint
    return write_streamed_llm(checkpoint, tmp_path_factory.mktemp("appended"), limits=tiny_spec.limits,
                              opset=tiny_spec.export.opset).path


@pytest.fixture()
def published(built_repository, tmp_path) -> Path:
    """A copy of the default repository in a place the test may break."""
    output = tmp_path / "model_repository"
    shutil.copytree(built_repository, output)
    return output


@pytest.fixture(scope="session")
def source_model(tiny_spec: BuildSpec) -> SourceModel:
    return load_checkpoint(resolve_source(tiny_spec.source, StageCache(CACHE)).checkpoint)


@pytest.fixture(scope="session")
def preprocessor(built_repository: Path, tiny_spec: BuildSpec) -> Preprocessor:
    """The server's own preprocessing, in-process: the reference sees the same tensors."""
    return load_preprocessor(built_repository, tiny_spec.limits)


@pytest.fixture(scope="session")
def server(built_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    from builder.serve.tritonserver import TritonServer

    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with TritonServer(built_repository, log_path=log) as running:
        yield running


@pytest.fixture()
def client(server):
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as connection:
        yield connection


def png_bytes(seed: int, size: tuple[int, int] = (96, 72)) -> bytes:
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def wav_bytes(seconds: float, frequency: float = 440.0, rate: int = 16000, channels: int = 1) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * frequency * t) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.repeat(tone, channels).tobytes())
    return buffer.getvalue()
