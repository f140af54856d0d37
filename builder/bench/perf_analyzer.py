"""Find the ``perf_analyzer`` shipped in the ``tritonclient`` manylinux wheel and run one measurement.

The binary links ``libb64.so.0d`` (Debian's ``libb64-0d``) and ``libcudart.so.12`` (the
``nvidia-cuda-runtime-cu12`` wheel, put on ``LD_LIBRARY_PATH`` here) even on a machine without a GPU.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from builder.errors import BuildError

_UNSTABLE = "Failed to obtain stable measurement"
_MISSING_LIBRARY_FIX = {
    "libb64.so": "apt-get update && apt-get install -y libb64-0d",
    "libcudart.so": "pip install -e '.[bench]' (nvidia-cuda-runtime-cu12)",
}


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    env: dict[str, str]


@dataclass(frozen=True)
class Measurement:
    """How long each point runs: count windows of ``requests`` requests, stable within ``stability`` %."""

    requests: int
    stability: int
    max_trials: int
    timeout_s: int = 900  # per perf_analyzer run, so a stuck server fails the benchmark instead of hanging it


@dataclass(frozen=True)
class Point:
    """Where one perf_analyzer run is measured and what it writes."""

    model: str
    concurrency: int
    input_data: Path
    csv: Path
    streaming: bool = False

    @property
    def profile(self) -> Path:
        return self.csv.with_suffix(".profile.json")


def find_perf_analyzer() -> PerfAnalyzer:
    """The binary from the installed ``tritonclient`` wheel, with its libraries found (or one clear error)."""
    try:
        files = metadata.files("tritonclient") or []
    except metadata.PackageNotFoundError:
        raise BuildError("perf_analyzer not found: pip install -e '.[bench]' (tritonclient 2.51 manylinux wheel)") from None
    binary = next((Path(str(f.locate())) for f in files if f.name == "perf_analyzer"), None)
    if binary is None or not binary.is_file():
        raise BuildError("this tritonclient wheel ships no bin/perf_analyzer: install the manylinux wheel (pip install 'tritonclient[all]==2.51.0')")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (_cudart_dir(), env.get("LD_LIBRARY_PATH")) if p)
    _check_libraries(binary, env)
    return PerfAnalyzer(binary.resolve(), env)


def _cudart_dir() -> str | None:
    try:
        files = metadata.files("nvidia-cuda-runtime-cu12") or []
    except metadata.PackageNotFoundError:
        return None
    found = next((f for f in files if f.name.startswith("libcudart.so.12")), None)
    return str(Path(str(found.locate())).parent) if found else None


def _check_libraries(binary: Path, env: dict[str, str]) -> None:
    try:
        ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env, check=False).stdout
    except FileNotFoundError:  # no ldd: perf_analyzer's own loader error will have to do
        return
    for line in ldd.splitlines():
        if "not found" in line:
            library = line.split("=>")[0].strip()
            fix = next((fix for prefix, fix in _MISSING_LIBRARY_FIX.items() if library.startswith(prefix)), None)
            raise BuildError(f"perf_analyzer needs {library}, which is missing: {fix or 'install it'}")


def measure(pa: PerfAnalyzer, url: str, point: Point, measurement: Measurement) -> bool:
    """Runs ``point``; True if it was stable, False if only a run without the stability check succeeded."""
    point.csv.parent.mkdir(parents=True, exist_ok=True)
    log = point.csv.with_suffix(".log")
    for stability in (measurement.stability, 1000):  # 1000 %: accept the windows as they are
        command = [
            str(pa.binary), "-m", point.model, "-u", url, "-i", "grpc", "--input-data", str(point.input_data),
            f"--concurrency-range={point.concurrency}:{point.concurrency}",
            "--measurement-mode=count_windows", f"--measurement-request-count={measurement.requests}",
            f"--stability-percentage={stability}", f"--max-trials={measurement.max_trials}", "-f", str(point.csv),
        ]
        if point.streaming:
            point.profile.unlink(missing_ok=True)  # perf_analyzer refuses to overwrite one (a rerun, a retry)
            command += ["--streaming", f"--profile-export-file={point.profile}"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=pa.env, check=False,
                                    timeout=measurement.timeout_s)
        except subprocess.TimeoutExpired:
            raise BuildError(f"perf_analyzer on {point.model} at concurrency {point.concurrency} did not finish "
                             f"in {measurement.timeout_s} s: is the server stuck? ({point.csv.parent / 'tritonserver.log'})") from None
        log.write_text(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}")
        if result.returncode == 0:
            return stability == measurement.stability
        if _UNSTABLE not in result.stdout + result.stderr:
            break
    raise BuildError(f"perf_analyzer failed on {point.model} at concurrency {point.concurrency} (see {log}):\n"
                     + "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:]))
