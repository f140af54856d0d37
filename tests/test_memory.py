"""How many copies of the LLM's weights the server holds, measured per process.

The tiny preset's decoder (under 1 MB) is lost in a Python stub's own 30-40 MB, so the preset is built
with a wider, deeper decoder (about 200 MB in FP32). Each process of the server (tritonserver and its
Python backend stubs) is read from /proc/PID/smaps_rollup: `Pss_Anon`, the memory its own allocations
hold, an ONNX Runtime session's weights among them. A process holds a copy when it holds 90% of the
graph's bytes; any other must stay under half of them. Totals are not compared: what the allocator
keeps after loading varies by up to a copy per process.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest

from builder.build import build
from builder.serve.client import Request, ask, ask_stream
from builder.source import tiny
from builder.spec import load_spec
from tests.conftest import CACHE, ROOT

pytestmark = pytest.mark.serving


def wide_config():
    """The preset with a decoder of about 210 MB in FP32: 8 layers, 1024 wide, MLP 2048."""
    config = tiny.tiny_config()
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 1024, 2048, 8
    return config


def anonymous_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss_Anon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no Pss_Anon in /proc/{pid}/smaps_rollup")


def held_by_process(server_pid: int) -> dict[str, int]:
    """Pss_Anon of the server ("tritonserver") and of each Python stub (named by its model's directory, then
    ``model#2``... for further instances)."""
    held = {"tritonserver": anonymous_bytes(server_pid)}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("PPid:"))
            command = (status.parent / "cmdline").read_bytes().split(b"\0")
            if ppid == server_pid and command[0].endswith(b"triton_python_backend_stub"):
                model = Path(command[1].decode()).parent.parent.name
                instance = model if model not in held else f"{model}#{sum(k.startswith(model) for k in held) + 1}"
                held[instance] = anonymous_bytes(int(status.parent.name))
        except (OSError, StopIteration):  # the process ended meanwhile
            continue
    return held


def serve_and_measure(repository: Path, entry_points: str, log: Path) -> dict[str, int]:
    import tritonclient.grpc as grpcclient

    from builder.serve.tritonserver import TritonServer

    with TritonServer(repository, log_path=log) as server:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:  # every decode model has run
            request = Request("What is in the picture?", max_tokens=4)
            if entry_points != "streaming":
                assert len(ask(client, request).token_ids) == 4
            if entry_points != "unary":
                assert len([t for _, ids in ask_stream(client, request) for t in ids]) == 4
        assert server._process is not None
        return held_by_process(server._process.pid)


def megabytes(held: dict[str, int]) -> str:
    return ", ".join(f"{name} {size / 1e6:.0f} MB" for name, size in sorted(held.items()))


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    checkpoint = tmp_path_factory.mktemp("memory") / "checkpoint"
    with mock.patch.dict(tiny.PRESETS, {"wide": wide_config}):
        return tiny.write_preset_checkpoint(checkpoint, "wide")


def build_and_measure(checkpoint: Path, entry_points: str, tmp_path: Path) -> tuple[int, dict[str, int]]:
    """(the LLM graph's bytes, Pss_Anon per process) of a served build of ``checkpoint``."""
    spec = load_spec(ROOT / "specs" / "tiny.yaml", {
        "source.preset": None, "source.checkpoint": str(checkpoint), "name": "memory-test",
        "triton.entry_points": entry_points, "export.atol": 1e-2,  # wide random layers: logits reach |100|
    })
    repository = tmp_path / "repo"
    build(spec, repository, CACHE, progress=False)
    weights = sum(f.stat().st_size for f in (repository / "llm" / "1").glob("model.onnx*"))
    assert weights > 150e6, weights
    held = serve_and_measure(repository, entry_points, tmp_path / "tritonserver.log")
    print(f"{entry_points}: weights {weights / 1e6:.0f} MB; Pss_Anon {megabytes(held)}")
    assert {"preprocess", "fuse", "tritonserver"} <= held.keys(), held
    return weights, held


def copies(weights: int, held: dict[str, int]) -> list[str]:
    """The processes holding a copy of the weights; fails if another holds a good part of one."""
    holders = sorted(name for name, size in held.items() if size > 0.9 * weights)
    others = {name: size for name, size in held.items() if name not in holders}
    assert max(others.values()) < 0.5 * weights, f"part of a copy: {megabytes(others)}"
    return holders


def test_both_entry_points_hold_the_weights_once(wide_checkpoint: Path, tmp_path: Path) -> None:
    """`llm` holds the weights; `ensemble_stream` (decoupled) polls it through BLS and holds none."""
    assert copies(*build_and_measure(wide_checkpoint, "both", tmp_path)) == ["llm"]
