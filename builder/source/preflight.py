"""Before loading a checkpoint: will the build fit this machine? Estimated from safetensors headers alone.

The build loads the checkpoint with the text decoder's weights left in the shards (its layers, embedding table and
lm_head are each read while they run, ``layers_on_demand``): the encoders are what it holds, in the load dtype. The
LLM graph is written from the shards a tensor at a time. What peaks then depends on the LLM's precision:

- FP32 / FP16: ONNX Runtime holding the LLM graph for the parity check and the gates. On the CPU it computes in FP32,
  so about 4 bytes per LLM parameter whether the graph is FP32 or FP16 (measured: a 1.34B-parameter FP32 build
  peaked at 6.3 GB, an FP16 one of 1.18B at 6.0 GB).
- INT8 / INT4: no FP32 graph exists; the gates compare each candidate, as ONNX Runtime holds it (its weight bytes,
  ``builder.sizing``'s count), with the checkpoint in PyTorch, which holds the encoders and one decoder part at a
  time in FP32. The larger of those two phases, each beside the encoders' FP32 graphs (the pipeline gate). A ladder
  that falls back to a wider rung holds that rung's bytes instead (FP32 last: the line above).

The in-place compile of the ONNX Runtime targets (``builder.compile.ort_llm_graph``) holds one session of the
settled graph at a time, as the gates do: within the same bound (6B INT4: 5.68 GB against the quantize stage's
6.15 GB).

Disk: each exported graph in that dtype (the LLM's integer graph alone when it is quantized), once more for a
quantized encoder. The in-place graph shares its weight files with the graph it was made from.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuildError
from builder.sizing import BYTES_PER_WEIGHT
from builder.source.headers import DTYPE_BYTES, component_of, numel, safetensors_header

SESSION_BYTES_PER_LLM_PARAMETER = 4.0  # ONNX Runtime on the CPU holds the LLM's weights in FP32 (see above)
BASE_RAM = 1_500_000_000  # Python, torch, transformers and onnxruntime themselves

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


def estimate(weight_files: list[Path], cache_dir: Path, llm_precision: str, quantized: bool) -> Preflight:
    """``llm_precision``: fp32 | fp16 | int8 | int4; ``quantized``: some component is (its graph is written twice)."""
    parameters = stored = decoder_layers = llm = embedding = 0
    for path in weight_files:
        for name, entry in safetensors_header(path).items():
            count = numel(entry)
            parameters, stored = parameters + count, stored + count * DTYPE_BYTES.get(entry["dtype"], 4)
            kind = component_of(name)
            if kind in ("llm", "embedding"):
                llm += count
                decoder_layers += count if ".layers." in name else 0
                embedding += count if kind == "embedding" else 0
    encoders = parameters - llm
    if llm_precision in BYTES_PER_WEIGHT and llm_precision != "fp16":  # integer weights: see the module's docstring
        graph = (llm - embedding) * BYTES_PER_WEIGHT[llm_precision] + embedding * 2
        largest_part = max(embedding, (llm - decoder_layers - embedding), decoder_layers // max(1, _layers(weight_files)))
        held = 4 * encoders + max(graph, 4 * largest_part)
        disk = graph + 4 * encoders * (2 if quantized else 1)
    else:
        per_parameter = {"fp32": 4, "fp16": 2}[llm_precision]
        held = encoders * per_parameter + llm * SESSION_BYTES_PER_LLM_PARAMETER
        disk = parameters * per_parameter * (2 if quantized else 1)
    existing = cache_dir if cache_dir.exists() else cache_dir.resolve().parent
    return Preflight(
        parameters=parameters, checkpoint_bytes=stored, peak_ram=int(BASE_RAM + held), disk=int(disk),
        available_ram=_available_ram(), free_disk=shutil.disk_usage(existing).free,
    )


def _layers(weight_files: list[Path]) -> int:
    """The decoder's layer count, from its tensor names (``...layers.N...``)."""
    found = {name.split(".layers.")[1].split(".")[0] for path in weight_files for name in safetensors_header(path)
             if ".layers." in name and component_of(name) == "llm"}
    return len(found)


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
