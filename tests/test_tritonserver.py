"""Start a real tritonserver (from nvidia-pytriton) on a toy Python-backend repository."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from builder.errors import BuildError

pytest.importorskip("pytriton")
grpcclient = pytest.importorskip("tritonclient.grpc")

from builder.serve.tritonserver import ALLOCATOR_TUNABLE, TritonInstall, TritonServer, find_tritonserver  # noqa: E402

pytestmark = pytest.mark.serving

CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "X", data_type: TYPE_FP32, dims: [ -1 ] }} ]
output [ {{ name: "Y", data_type: TYPE_FP32, dims: [ -1 ] }} ]
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
"""

ADD_ONE = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            y = pb_utils.Tensor("Y", x + 1)
            responses.append(pb_utils.InferenceResponse(output_tensors=[y]))
        return responses
"""

BROKEN = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("toy model cannot find its weights")

    def execute(self, requests):
        return []
"""


def write_model(repository: Path, name: str, model_py: str) -> None:
    version = repository / name / "1"
    version.mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(CONFIG.format(name=name))
    (version / "model.py").write_text(textwrap.dedent(model_py))


def process_group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def test_find_tritonserver_installs_the_python_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITONSERVER", raising=False)
    install = find_tritonserver()
    assert install.binary.is_file()
    assert (install.backend_dir / "python" / "triton_python_backend_stub").is_file()
    assert find_tritonserver() == install  # idempotent


def test_without_pytriton_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITONSERVER", raising=False)
    monkeypatch.setitem(sys.modules, "pytriton", None)  # makes `import pytriton` fail
    with pytest.raises(BuildError, match=r"pip install -e '\.\[serve\]'"):
        find_tritonserver()


def test_tritonserver_env_var_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    binary = tmp_path / "tritonserver"
    binary.touch()
    monkeypatch.setenv("TRITONSERVER", str(binary))
    monkeypatch.delenv("TRITON_BACKEND_DIR", raising=False)
    assert find_tritonserver() == TritonInstall(binary, Path("/opt/tritonserver/backends"))
    monkeypatch.setenv("TRITON_BACKEND_DIR", str(tmp_path))
    assert find_tritonserver().backend_dir == tmp_path


def test_serves_a_python_model_and_stops_cleanly(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    write_model(repository, "add_one", ADD_ONE)
    server = TritonServer(repository, log_path=tmp_path / "server.log")
    with server:
        assert server._process is not None
        group = server._process.pid
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            x = np.array([1.0, 2.5, -3.0], dtype=np.float32)
            request = grpcclient.InferInput("X", list(x.shape), "FP32")
            request.set_data_from_numpy(x)
            result = client.infer("add_one", [request])
            np.testing.assert_array_equal(result.as_numpy("Y"), x + 1)
        assert process_group_alive(group)  # server + python backend stub
        stubs = [pid for pid in server.processes() if Path(f"/proc/{pid}/comm").read_text().startswith("triton_python")]
        assert stubs  # each model's stub, where the weights live, runs with the allocator setting
        for pid in stubs:
            environ = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
            assert ALLOCATOR_TUNABLE in environ["GLIBC_TUNABLES"].split(":")
    assert not process_group_alive(group)


def test_broken_model_fails_wait_ready_with_its_error(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    write_model(repository, "broken", BROKEN)
    server = TritonServer(repository, log_path=tmp_path / "server.log")
    server.start()
    try:
        with pytest.raises(BuildError, match="toy model cannot find its weights"):
            server.wait_ready(timeout=60)
    finally:
        server.stop()
