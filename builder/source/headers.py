"""What a checkpoint's safetensors headers say, read without reading a tensor: names, shapes, dtypes, and which
component a tensor belongs to. The pre-flight check and ``builder plan`` count from them."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


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
            sum(numel(e) * DTYPE_BYTES.get(e["dtype"], 4) for e in header.values()))


def component_of(tensor: str) -> str:
    """Which component a tensor belongs to, by the names HF multimodal checkpoints use."""
    if ("vision_tower" in tensor or "multi_modal_projector" in tensor or "vision_model" in tensor
            or tensor.startswith(("visual.", "thinker.visual."))):  # Qwen2.5-Omni's vision tower and merger
        return "vision_encoder"
    if "audio_tower" in tensor or "audio_projector" in tensor:
        return "audio_encoder"
    return "embedding" if tensor.endswith("embed_tokens.weight") else "llm"
