"""What every family's served test does the same way: a spec pointed at its checkpoint, a real tritonserver over
the built repository, and the INT8 build's promise (each component gated, the pipeline gated, fallbacks said)."""

from __future__ import annotations

import io
import json
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from builder.spec import BuildSpec, load_spec
from tests.conftest import ROOT


def family_spec(template: str, checkpoint: Path, **limits: int) -> BuildSpec:
    """``specs/<template>`` pointed at ``checkpoint``, with its limits overridden by ``limits``."""
    return load_spec(ROOT / "specs" / template, {
        "source.preset": None, "source.checkpoint": str(checkpoint), "name": f"{checkpoint.parent.name}-test",
        **{f"limits.{key}": value for key, value in limits.items()},
    })


@contextmanager
def serving(repository: Path, log_directory: Path) -> Iterator[grpcclient.InferenceServerClient]:
    """A real tritonserver on ``repository`` and a gRPC client to it."""
    from builder.serve.tritonserver import TritonServer

    with TritonServer(repository, log_path=log_directory / "tritonserver.log") as server:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            yield client


def noisy_wav(seed: int, seconds: float, rate: int = 16000) -> bytes:
    """A tone under noise, 16-bit mono: features an audio tower can tell apart."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) + 0.05 * rng.standard_normal(t.size)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def assert_int8_kept_its_promise(spec: BuildSpec, repository: Path, printed: str, kinds: list[str]) -> None:
    """What an INT8 build promises on any CPU: each published component passed its own gate, the pipeline passed the
    pipeline gate for every kind of request the model takes, and a component kept in float says why."""
    manifest = json.loads((repository / "manifest.json").read_text())
    pipeline = manifest["pipeline_gate"]
    assert pipeline["passed"] and [k["kind"] for k in pipeline["figures"]["kinds"]] == kinds
    assert all(k["agreement"]["agreement"] >= spec.quantize.pipeline_gate.min_agreement for k in pipeline["figures"]["kinds"])
    for name, component in manifest["components"].items():
        last = component["quantization"]["attempts"][-1]
        assert not last["gate"] or not last["gate"]["failures"], name
        if component["precision"] != "int8":
            assert "fell back after" in printed or f"pipeline gate: {name}" in printed, name
