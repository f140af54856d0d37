"""Before loading a checkpoint: will the build fit this machine? Estimated from safetensors headers alone.

The export loads the model in the LLM's export dtype (FP32, or FP16 for an FP16 build) and
torch.onnx holds about a second copy while it writes the graph: a 680M-parameter Mistral-3
(2.7 GB in FP32) peaked at 5.9 GB, 2.2x its loaded bytes. In FP16 the parity check's ONNX Runtime
session on the CPU also widens the weights it computes with to FP32: a 1.2B-parameter checkpoint
(2.35 GB in FP16, benchmarks/big_checkpoint.py) peaked at 8.2 GB, 2.8x. Disk: each exported graph
in that dtype, once more for a quantized copy.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuildError

PEAK_RAM_PER_LOADED_BYTE = {"float32": 2.2, "float16": 3.0}  # measured (see above), FP16 rounded up
BASE_RAM = 1_500_000_000  # Python, torch, transformers and onnxruntime themselves
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}

GB = 1e9


@dataclass(frozen=True)
class Preflight:
    parameters: int
    checkpoint_bytes: int  # weight bytes as stored (BF16 checkpoints: 2 per parameter)
    peak_ram: int  # estimated, bytes
    disk: int  # estimated new cache bytes
    available_ram: int
    free_disk: int

    def summary(self) -> str:
        return (f"{self.parameters / 1e6:.1f}M parameters ({self.checkpoint_bytes / GB:.2f} GB as stored): "
                f"estimated peak RAM {self.peak_ram / GB:.1f} GB of {self.available_ram / GB:.1f} GB available, "
                f"disk {self.disk / GB:.1f} GB of {self.free_disk / GB:.1f} GB free")

    def check(self) -> None:
        if self.peak_ram > self.available_ram:
            raise BuildError(f"not enough memory to build: {self.summary()}; build on a larger machine")
        if self.disk > self.free_disk:
            raise BuildError(f"not enough disk for the build cache: {self.summary()}; free space or set --cache")


def safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name -> its header entry (``dtype``, ``shape``, offsets), read without reading a tensor."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def numel(entry: dict) -> int:
    return math.prod(entry["shape"])


def tensor_bytes(path: Path) -> tuple[int, int]:
    """(parameters, bytes) of one safetensors file, from its JSON header (no tensor is read)."""
    header = safetensors_header(path)
    return (sum(numel(e) for e in header.values()),
            sum(numel(e) * _DTYPE_BYTES.get(e["dtype"], 4) for e in header.values()))


def estimate(weight_files: list[Path], cache_dir: Path, dtype: str, extra_copy: bool) -> Preflight:
    """``dtype``: what the weights load as (float32, float16); ``extra_copy``: some component is quantized,
    so its graph is written twice."""
    parameters = stored = 0
    for path in weight_files:
        count, size = tensor_bytes(path)
        parameters, stored = parameters + count, stored + size
    loaded = parameters * {"float32": 4, "float16": 2}[dtype]
    existing = cache_dir if cache_dir.exists() else cache_dir.resolve().parent
    return Preflight(
        parameters=parameters, checkpoint_bytes=stored,
        peak_ram=int(PEAK_RAM_PER_LOADED_BYTE[dtype] * loaded + BASE_RAM),
        disk=loaded * (2 if extra_copy else 1),
        available_ram=_available_ram(), free_disk=shutil.disk_usage(existing).free,
    )


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
