"""Writes a Mistral-3 checkpoint of a chosen size without ever holding it in memory.

BF16 safetensors shards with the key names transformers' ``save_pretrained`` writes (its own reverse renaming of the
model's parameter names), ``model.safetensors.index.json``, ``config.json``, and the tiny preset's tokenizer,
chat template and Pixtral processor files (the preset's small vision tower: the benchmark is about the decoder).
Each tensor is drawn from its own seeded generator (std 0.02, norms 1) and written straight into its shard, whose
header is computed from the shapes first::

    python benchmarks/write_large_checkpoint.py DIR --params 6e9              # hidden 4096, layers to match
    python benchmarks/write_large_checkpoint.py DIR --hidden 2048 --layers 22 --vocab 32768
"""

from __future__ import annotations

import argparse
import json
import struct
import time
from pathlib import Path

import torch
from transformers import Mistral3ForConditionalGeneration
from transformers.core_model_loading import revert_weight_conversion

from builder.source.tiny import tiny_config, write_tokenizer_and_processor

SHARD_BYTES = 2_000_000_000
BYTES_PER_VALUE = 2  # BF16


def large_config(hidden: int, layers: int, vocab: int) -> object:
    """The preset's config (vision tower, token ids) with a Mistral-sized decoder: head_dim 128, 4 query heads per
    KV head, MLP 3.5x wide; untied lm_head, as Mistral Small / Magistral."""
    config = tiny_config()
    del config.audio_config  # vision + text, as published Mistral-3 checkpoints are
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, hidden * 7 // 2, layers
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = hidden // 128, max(1, hidden // 512), 128
    text.vocab_size, text.tie_word_embeddings, config.tie_word_embeddings = vocab, False, False
    text.max_position_embeddings = 32768
    return config


def layers_for(params: float, hidden: int, vocab: int) -> int:
    per_layer = hidden * (hidden + 2 * hidden // 4 + hidden) + 3 * hidden * (hidden * 7 // 2)
    return max(1, round((params - 2 * vocab * hidden) / per_layer))


def saved_shapes(config: object) -> dict[str, tuple[int, ...]]:
    """Key -> shape as save_pretrained would write them, from a model whose parameters live on the meta device."""
    with torch.device("meta"):
        model = Mistral3ForConditionalGeneration(config)
    state = revert_weight_conversion(model, model.state_dict())
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def random_bf16(key: str, shape: tuple[int, ...], seed: int) -> bytes:
    if key.endswith(("norm.weight", "ln_pre.weight")):
        tensor = torch.ones(shape, dtype=torch.bfloat16)
    else:
        tensor = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(torch.bfloat16)
    return tensor.view(torch.int16).numpy().tobytes()


def write_checkpoint(directory: Path, config: object, seed: int = 0) -> int:
    """Writes the shards tensor by tensor; returns the bytes of weights written."""
    directory.mkdir(parents=True, exist_ok=True)
    shapes = saved_shapes(config)
    shards: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = BYTES_PER_VALUE * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    weight_map, total = {}, 0
    for number, keys in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key in keys:
            nbytes = BYTES_PER_VALUE * int(torch.Size(shapes[key]).numel())
            header[key] = {"dtype": "BF16", "shape": list(shapes[key]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        with (directory / name).open("wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            for key in keys:
                handle.write(random_bf16(key, shapes[key], seed + list(shapes).index(key)))
                weight_map[key] = name
        total += offset
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.architectures = ["Mistral3ForConditionalGeneration"]
    config.dtype = "bfloat16"
    config.save_pretrained(directory)
    write_tokenizer_and_processor(directory, config)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--params", type=float, help="parameters wanted (sets --layers)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    layers = layers_for(args.params, args.hidden, args.vocab) if args.params else args.layers
    started = time.perf_counter()
    total = write_checkpoint(args.directory, large_config(args.hidden, layers, args.vocab), args.seed)
    print(f"{args.directory}: {total / BYTES_PER_VALUE / 1e9:.2f}B parameters, {layers} layers x {args.hidden}, "
          f"{total / 1e9:.2f} GB BF16 in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
