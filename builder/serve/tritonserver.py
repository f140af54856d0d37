"""Find and run a real ``tritonserver`` (the one inside ``nvidia-pytriton`` by default).

The server runs in its own process group so that stopping it also stops the Python
backend stubs it forks, and with this interpreter's ``bin/`` first on ``PATH`` so that
``model.py`` files run with this environment's packages.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuildError

# The Triton release repositories are built and tested for: the CPU server of nvidia-pytriton 0.7.0
# here, the NGC image of the same release on a GPU (deploy/Dockerfile's FROM; the manifest records both).
TRITON_VERSION = "2.51.0"
NGC_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
STUB_NAME = "triton_python_backend_stub"
# glibc's malloc asks the kernel for transparent huge pages (madvise) on what it maps: ONNX Runtime's weights,
# read whole at every decode step, then cost far fewer TLB misses (benchmarks/huge_pages.py measures it side by
# side; the README quotes it). Needs glibc >= 2.35 and
# THP "madvise" or "always" (/sys/kernel/mm/transparent_hugepage/enabled); elsewhere it changes nothing.
# Set for every server this project starts and in deploy/Dockerfile.
ALLOCATOR_TUNABLE = "glibc.malloc.hugetlb=1"
DEFAULT_CONTAINER_BACKENDS = Path("/opt/tritonserver/backends")
# Error-level log lines, e.g. E1122 02:12:12.889 3225 model_lifecycle.cc:642] "failed to load ..."
_ERROR_LINE = re.compile(r'^E\d{4} [\d:.]+ +\d+ (?P<where>[\w.]+:\d+)\] "?(?P<message>.*?)"?$', re.M)


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path


def find_tritonserver() -> TritonInstall:
    """The server named by ``$TRITONSERVER``, else the one shipped in the ``pytriton`` wheel."""
    override = os.environ.get("TRITONSERVER")
    if override:
        if not Path(override).is_file():
            raise BuildError(f"TRITONSERVER={override} is not a file")
        backends = os.environ.get("TRITON_BACKEND_DIR", str(DEFAULT_CONTAINER_BACKENDS))
        return TritonInstall(binary=Path(override), backend_dir=Path(backends))
    try:
        import pytriton
    except ImportError:
        raise BuildError("tritonserver not found: pip install -e '.[serve]' (nvidia-pytriton)") from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    install = TritonInstall(binary=root / "bin" / "tritonserver", backend_dir=root / "backends")
    _install_python_stub(root, install.backend_dir / "python")
    return install


def _install_python_stub(root: Path, python_backend: Path) -> None:
    """Copy the backend stub built for this interpreter's version next to the Python backend."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = root / "python_backend_stubs" / version / STUB_NAME
    target = python_backend / STUB_NAME
    if not source.is_file():
        raise BuildError(f"pytriton ships no Python backend stub for Python {version} ({source})")
    if target.is_file() and filecmp.cmp(source, target):
        return
    try:
        shutil.copy2(source, target)
    except OSError as error:
        raise BuildError(f"cannot install the Python backend stub into {python_backend}: {error}") from None


def _free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct ports free now: all bound at once, so the kernel cannot hand out one twice."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def _signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:  # the whole group is already gone
        pass


def serving_environment(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with ALLOCATOR_TUNABLE added to its GLIBC_TUNABLES (unless it sets that tunable itself)."""
    env = dict(base)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    name = ALLOCATOR_TUNABLE.split("=")[0]
    if not any(t.split("=")[0] == name for t in tunables):
        env["GLIBC_TUNABLES"] = ":".join([*tunables, ALLOCATOR_TUNABLE])
    return env


class TritonServer:
    """A ``tritonserver`` process serving ``model_repository``; use as a context manager."""

    def __init__(
        self,
        model_repository: Path | str,  # a directory, or an s3:// URL as tritonserver takes it
        *,
        host: str = "127.0.0.1",
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
        python: Path | None = None,
    ) -> None:
        """``python``: the interpreter whose environment the Python backend's models run in (default: this one)."""
        remote = isinstance(model_repository, str) and model_repository.startswith("s3://")
        self.model_repository = model_repository if remote else Path(model_repository)
        self.host = host
        free = _free_ports(host, 3)
        self.grpc_port = grpc_port or free[0]
        self.http_port = http_port or free[1]
        self.metrics_port = metrics_port or free[2]
        if log_path is None:
            log_path = Path(tempfile.mkdtemp(prefix="tritonserver-")) / "server.log"
        self.log_path = Path(log_path)
        self.extra_args = tuple(extra_args)
        self.python = Path(python or sys.executable)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self, install: TritonInstall) -> list[str]:
        args = [
            str(install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={install.backend_dir}",
        ]
        for service, port in (("grpc", self.grpc_port), ("http", self.http_port), ("metrics", self.metrics_port)):
            args += [f"--{service}-address={self.host}", f"--{service}-port={port}"]
        return [*args, "--log-verbose=0", *self.extra_args]

    def start(self) -> None:
        if self._process is not None:
            raise BuildError("tritonserver is already running")
        install = find_tritonserver()
        env = serving_environment(os.environ)
        env["PATH"] = os.pathsep.join([str(self.python.parent), env.get("PATH", "")])
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                self.command(install),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: stop() also reaches the stubs
            )

    def wait_ready(self, timeout: float = 120) -> None:
        """Block until the server reports ready; BuildError (with the log tail) otherwise."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        if self._process is None:
            raise BuildError("tritonserver was not started")
        deadline = time.monotonic() + timeout
        with grpcclient.InferenceServerClient(self.grpc_url) as client:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise BuildError(
                        f"tritonserver exited with code {self._process.returncode}:\n{self.log_tail()}"
                    )
                try:
                    if client.is_server_ready(client_timeout=2):
                        return
                except InferenceServerException:
                    pass
                time.sleep(0.25)
        raise BuildError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace: float = 15) -> None:
        """SIGTERM the server's process group, then SIGKILL whatever is left after ``grace`` s."""
        process, self._process = self._process, None
        if process is None:
            return
        group = process.pid  # start_new_session made the server its group leader
        _signal_group(group, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(group, signal.SIGKILL)  # whatever outlived the grace period (stubs, a hung server)
        process.wait()

    def processes(self) -> list[int]:
        """The running server's process ids: tritonserver and every Python backend stub (its process group)."""
        if self._process is None:
            return []
        group, pids = self._process.pid, []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, ...
            except OSError:  # the process ended meanwhile
                continue
            if int(fields[2]) == group:
                pids.append(int(stat.parent.name))
        return pids

    def log_tail(self, lines: int = 30) -> str:
        """The server's error lines (e.g. why a model failed to load), then its last ``lines`` lines."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        errors = [  # without the CUDA/NVML complaints of a machine with no GPU
            f"{m['where']}: {m['message']}".replace("\\n", "\n").rstrip()
            for m in _ERROR_LINE.finditer(text)
            if "cuda" not in m["message"].lower()
        ]
        tail = "\n".join(text.splitlines()[-lines:])
        return "\n".join([*errors, f"--- last {lines} lines of {self.log_path} ---", tail])

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
