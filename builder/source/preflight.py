"""Before loading a checkpoint: will the build fit this machine? Estimated from safetensors headers alone.

The build loads the checkpoint with the text decoder's layers left in the shards (each is read while it runs,
``layers_on_demand``): the encoders, the embedding table and the lm_head are what it holds, in the load dtype. The
LLM graph is written from the shards a tensor at a time. What peaks is ONNX Runtime holding that graph: the
parity check's session, and for a quantized LLM the gates' sessions of the float reference and the candidate side
by side. On the CPU ONNX Runtime computes in FP32, so the session holds about 4 bytes per LLM parameter whether
the graph is FP32 or FP16 (measured: a 1.34B-parameter FP32 build peaked at 6.3 GB, an FP16 one of 1.18B at
6.0 GB); a quantized LLM's gates hold about 3 bytes per parameter more. Disk: each exported graph in that dtype, once more for a quantized copy.
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

SESSION_BYTES_PER_LLM_PARAMETER = 4.0  # ONNX Runtime on the CPU holds the LLM's weights in FP32 (see above)
# A quantized LLM's gates hold more beside it: the candidate, and the pipeline gate's float and quantized pipelines
# (measured: 6.8 bytes per LLM parameter in all at 1.34B in INT8, 10.9 GB).
QUANTIZED_SESSION_BYTES_PER_LLM_PARAMETER = 3.0
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
    so its graph is written twice and gated beside its float reference."""
    parameters = stored = decoder_layers = llm = 0
    for path in weight_files:
        for name, entry in safetensors_header(path).items():
            count = numel(entry)
            parameters, stored = parameters + count, stored + count * _DTYPE_BYTES.get(entry["dtype"], 4)
            if component_of(name) in ("llm", "embedding"):
                llm += count
                decoder_layers += count if ".layers." in name else 0
    per_parameter = {"float32": 4, "float16": 2}[dtype]
    resident = (parameters - decoder_layers) * per_parameter  # loaded; the decoder's layers stay in the shards
    session = llm * (SESSION_BYTES_PER_LLM_PARAMETER + (QUANTIZED_SESSION_BYTES_PER_LLM_PARAMETER if extra_copy else 0))
    existing = cache_dir if cache_dir.exists() else cache_dir.resolve().parent
    return Preflight(
        parameters=parameters, checkpoint_bytes=stored, peak_ram=int(BASE_RAM + resident + session),
        disk=parameters * per_parameter * (2 if extra_copy else 1),
        available_ram=_available_ram(), free_disk=shutil.disk_usage(existing).free,
    )


def stored_dtype(weight_files: list[Path]) -> str:
    """The torch dtype name the checkpoint's embedding table is stored in (its weights' dtype: float32, bfloat16...)."""
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    for path in weight_files:
        for name, entry in safetensors_header(path).items():
            if component_of(name) == "embedding" and entry["dtype"] in names:
                return names[entry["dtype"]]
    return "float32"


def component_of(tensor: str) -> str:
    """Which component a tensor belongs to, by the names HF multimodal checkpoints use."""
    if ("vision_tower" in tensor or "multi_modal_projector" in tensor or "vision_model" in tensor
            or tensor.startswith(("visual.", "thinker.visual."))):  # Qwen2.5-Omni's vision tower and merger
        return "vision_encoder"
    if "audio_tower" in tensor or "audio_projector" in tensor:
        return "audio_encoder"
    return "embedding" if tensor.endswith("embed_tokens.weight") else "llm"


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
