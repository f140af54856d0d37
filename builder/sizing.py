"""How much GPU a checkpoint needs to serve, from ``config.json`` and the safetensors headers alone
(no weight loaded): weights per precision as the build writes them, KV bytes per position (times the
three copies a decode step holds: each sequence's, the batch's past and present), the encoders in
FP16 plus an allowance for the CUDA context, how many sequences fit, and the decode bound from
memory bandwidth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuildError
from builder.source.headers import component_of, numel, safetensors_header

GIB = 1024**3
KV_COPIES = 3  # per position at a decode step: the sequence's cache, the batch's past, its present
BLOCK = 32  # weight-only quantization: weights per scale
# A scale has the graph's activation type, FP32 (MatMulNBits' T, DequantizeLinear's output): the 6B INT4 graph's
# bytes equal this count (benchmarks/results/streamed_llm_6b/).
SCALE_BYTES = 4
RUNTIME_ALLOWANCE = 2 * GIB  # CUDA context, cuBLAS workspaces, activations of a step
USABLE = 0.92  # of the GPU's memory: what the driver and fragmentation leave
BYTES_PER_WEIGHT = {"fp16": 2.0, "int8": 1.0 + SCALE_BYTES / BLOCK, "int4": 0.5 + SCALE_BYTES / BLOCK}


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    bandwidth_gbs: float  # memory read bandwidth, GB/s (datasheet)


# Datasheet figures of GPUs small teams run; any other: --gpu-memory-gib and --gpu-bandwidth-gbs.
GPU_SIZES_GIB = (16, 24, 48, 80)  # the cards small teams run, by memory alone: the fit table for every plan
GPUS = {g.name.lower(): g for g in (
    Gpu("L4", 24, 300), Gpu("A10", 24, 600), Gpu("RTX4090", 24, 1008), Gpu("A100-40GB", 40, 1555),
    Gpu("L40S", 48, 864), Gpu("RTX6000Ada", 48, 960), Gpu("A100-80GB", 80, 2039), Gpu("H100", 80, 3350),
)}


@dataclass(frozen=True)
class ModelSize:
    llm_parameters: int
    embedding_parameters: int  # the input embedding table: a lookup, never quantized
    encoder_parameters: dict[str, int]  # vision_encoder / audio_encoder
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int  # of the decoder's MLP: its widest matrix, hidden_size x intermediate_size

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2  # FP16/BF16

    def llm_bytes(self, precision: str) -> int:
        return int(self.decode_parameters * BYTES_PER_WEIGHT[precision] + self.embedding_parameters * 2)

    @property
    def decode_parameters(self) -> int:
        """The weights a decode step reads and multiplies each sequence by: all but the embedding table (a lookup)."""
        return self.llm_parameters - self.embedding_parameters

    def decode_read_bytes(self, precision: str) -> int:
        per_weight = 4.0 if precision == "fp32" else BYTES_PER_WEIGHT[precision]
        return int(self.decode_parameters * per_weight)

    @property
    def encoder_bytes(self) -> int:
        return 2 * sum(self.encoder_parameters.values())


def read_size(checkpoint: Path) -> ModelSize:
    config_path = Path(checkpoint) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise BuildError(f"{config_path}: cannot read ({exc})") from None
    text = config.get("text_config", config)
    shards = sorted(Path(checkpoint).glob("*.safetensors"))
    if not shards:
        raise BuildError(f"{checkpoint}: no *.safetensors files to count the weights from")
    counts: dict[str, int] = {"llm": 0, "embedding": 0, "vision_encoder": 0, "audio_encoder": 0}
    for shard in shards:
        for name, entry in safetensors_header(shard).items():
            counts[component_of(name)] += numel(entry)
    heads = text["num_attention_heads"]
    return ModelSize(
        llm_parameters=counts["llm"] + counts["embedding"], embedding_parameters=counts["embedding"],
        encoder_parameters={c: counts[c] for c in ("vision_encoder", "audio_encoder") if counts[c]},
        num_layers=text["num_hidden_layers"], num_kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or text["hidden_size"] // heads,
        hidden_size=text["hidden_size"], intermediate_size=text.get("intermediate_size") or 4 * text["hidden_size"],
    )


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


@dataclass(frozen=True)
class Fit:
    precision: str
    weights_gb: float  # decimal GB, as model cards count
    free_for_kv_gb: float
    sequences: int  # at the asked context, each at full length
    decode_tokens_per_s: float  # batch 1 bound: every weight and the sequence's KV read once per token


def fit(size: ModelSize, gpu: Gpu, context: int, precision: str, gpus: int = 1) -> Fit:
    """``gpus``: one instance, a whole copy of the model, on each (the runtime has no tensor parallelism),
    so a model must fit one GPU and sequences add up across them."""
    weights = size.llm_bytes(precision) + size.encoder_bytes
    free = gpu.memory_gib * GIB * USABLE - weights - RUNTIME_ALLOWANCE
    per_sequence = KV_COPIES * context * size.kv_bytes_per_token
    read_per_token = size.llm_bytes(precision) + context * size.kv_bytes_per_token
    return Fit(precision, weights / 1e9, max(free, 0) / 1e9, gpus * max(int(free // per_sequence), 0),
               gpu.bandwidth_gbs * 1e9 / read_per_token)


def report(size: ModelSize, gpu: Gpu, context: int, gpus: int = 1) -> str:
    """The table and a recommended spec, as ``python -m builder plan`` prints them."""
    encoders = ", ".join(f"{k} {_count(v)}" for k, v in size.encoder_parameters.items()) or "none"
    sequence = context * size.kv_bytes_per_token
    lines = [
        (f"decoder {_count(size.llm_parameters)} parameters ({size.num_layers} layers, {size.num_kv_heads} KV heads x "
         f"{size.head_dim}); encoders {_count(sum(size.encoder_parameters.values()))} ({encoders})"),
        (f"KV cache: {size.kv_bytes_per_token / 1024:g} KiB per position (FP16); a {context}-token sequence "
         f"{sequence / GIB:.3g} GiB, held x{KV_COPIES} at a decode step"),
        (f"on {gpus} x {gpu.name} ({gpu.memory_gib:g} GiB, {gpu.bandwidth_gbs:g} GB/s; a whole copy on each), "
         f"context {context}:"),
        "| precision | weights GB per GPU | left for KV GB per GPU | sequences at full context | decode tok/s bound (batch 1) |",
        "|---|---:|---:|---:|---:|",
    ]
    fits = [fit(size, gpu, context, p, gpus) for p in BYTES_PER_WEIGHT]
    for f in fits:
        lines.append(f"| {f.precision} | {f.weights_gb:.1f} | {f.free_for_kv_gb:.1f} | {f.sequences} | {f.decode_tokens_per_s:.0f} |")
    lines += [f"sequences of {context} tokens on one GPU of each size (0: the weights leave no room for one):",
              "| GPU memory | " + " | ".join(BYTES_PER_WEIGHT) + " |", "|---|" + "---:|" * len(BYTES_PER_WEIGHT)]
    for memory in GPU_SIZES_GIB:
        sized = Gpu(f"{memory} GiB", memory, gpu.bandwidth_gbs)
        lines.append(f"| {memory} GiB | " + " | ".join(str(fit(size, sized, context, p).sequences) for p in BYTES_PER_WEIGHT) + " |")
    chosen = next((f for f in fits if f.sequences >= 4), next((f for f in fits if f.sequences >= 1), None))
    if chosen is None:
        lines.append(f"does not fit: not one {context}-token sequence beside the weights on one GPU; a shorter context, "
                     "a lower precision or a larger GPU")
        return "\n".join(lines)
    batch = min(chosen.sequences // gpus, 16)  # per instance
    lines += [
        f"recommended: {chosen.precision} ({chosen.sequences} sequences of {context} tokens fit)",
        "spec:",
        f"  components: {{llm: {{precision: {chosen.precision}}}}}",
        f"  limits: {{max_context: {context}}}",
        f"  triton: {{max_batch_size: {batch}, kv_budget_tokens: {batch * context}}}  # per instance, one per GPU",
    ]
    return "\n".join(lines)
