"""The sizing planner (`python -m builder plan`): figures for a 24B config, and for the tiny preset the
bytes actually in its graph and its KV cache."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest

from builder.runtime.generation import LanguageModelRunner, SamplingParams
from builder.runtime.model_facts import ModelFacts
from builder.sizing import GIB, GPUS, fit, read_size
from builder.onnx_files import load_onnx
from tests.conftest import run_cli

# Magistral Small 1.2 / Mistral Small 3.2 (config.json as published): Pixtral vision + Mistral decoder.
TEXT = {"vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 32768, "num_hidden_layers": 40,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}
VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "patch_size": 14}


def magistral_tensors() -> dict[str, list[int]]:
    t, v = TEXT, VISION
    q, kv = t["num_attention_heads"] * t["head_dim"], t["num_key_value_heads"] * t["head_dim"]
    h, m = t["hidden_size"], t["intermediate_size"]
    shapes = {"model.language_model.embed_tokens.weight": [t["vocab_size"], h], "lm_head.weight": [t["vocab_size"], h],
              "model.language_model.norm.weight": [h]}
    for i in range(t["num_hidden_layers"]):
        layer = f"model.language_model.layers.{i}."
        shapes |= {layer + "self_attn.q_proj.weight": [q, h], layer + "self_attn.k_proj.weight": [kv, h],
                   layer + "self_attn.v_proj.weight": [kv, h], layer + "self_attn.o_proj.weight": [h, q],
                   layer + "mlp.gate_proj.weight": [m, h], layer + "mlp.up_proj.weight": [m, h],
                   layer + "mlp.down_proj.weight": [h, m], layer + "input_layernorm.weight": [h],
                   layer + "post_attention_layernorm.weight": [h]}
    vh, vm = v["hidden_size"], v["intermediate_size"]
    shapes["model.vision_tower.patch_conv.weight"] = [vh, 3, v["patch_size"], v["patch_size"]]
    for i in range(v["num_hidden_layers"]):
        layer = f"model.vision_tower.transformer.layers.{i}."
        shapes |= {layer + f"attention.{p}_proj.weight": [vh, vh] for p in "qkvo"}
        shapes |= {layer + "feed_forward.gate_proj.weight": [vm, vh], layer + "feed_forward.up_proj.weight": [vm, vh],
                   layer + "feed_forward.down_proj.weight": [vh, vm]}
    shapes |= {"model.multi_modal_projector.patch_merger.merging_layer.weight": [vh, 4 * vh],
               "model.multi_modal_projector.linear_1.weight": [h, vh], "model.multi_modal_projector.linear_2.weight": [h, h]}
    return shapes


def write_headers_only(directory: Path, shapes: dict[str, list[int]], shards: int = 10) -> Path:
    """Safetensors files with their headers and no data: all the planner reads (48 GB are not written)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "mistral3", "text_config": TEXT, "vision_config": VISION}))
    names = sorted(shapes)
    for index in range(shards):
        header, offset = {}, 0
        for name in names[index::shards]:
            size = int(np.prod(shapes[name])) * 2
            header[name] = {"dtype": "BF16", "shape": shapes[name], "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header).encode()
        (directory / f"model-{index:05d}-of-{shards:05d}.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    return directory


@pytest.fixture(scope="module")
def magistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_headers_only(tmp_path_factory.mktemp("magistral") / "checkpoint", magistral_tensors())


def test_a_24b_checkpoint_in_each_precision(magistral: Path) -> None:
    size = read_size(magistral)
    total = size.llm_parameters + sum(size.encoder_parameters.values())
    assert 23.5e9 < total < 24.5e9 and 0.3e9 < size.encoder_parameters["vision_encoder"] < 0.6e9
    assert 47e9 < size.llm_bytes("fp16") + size.encoder_bytes < 49e9  # about 48 GB of BF16 weights
    assert 26e9 <= size.llm_bytes("int8") <= 28e9  # a byte a weight and an FP32 scale per 32
    assert 14.5e9 <= size.llm_bytes("int4") <= 16e9
    assert size.kv_bytes_per_token == 160 * 1024  # 160 KiB per position
    assert 40_960 * size.kv_bytes_per_token == 6.25 * GIB  # a 40k-token sequence
    l40s = [fit(size, GPUS["l40s"], 8192, p) for p in ("fp16", "int8")]
    assert l40s[0].sequences == 0 and l40s[1].sequences >= 4  # BF16 does not fit one 48 GB GPU; INT8 does
    assert fit(size, GPUS["h100"], 8192, "fp16").sequences >= 4
    # A batch-1 decode step reads every weight but the embedding table's: the bench's bandwidth bound.
    assert size.decode_read_bytes("fp32") == 2 * size.decode_read_bytes("fp16") < 4 * size.llm_parameters
    assert size.decode_read_bytes("int4") < size.decode_read_bytes("int8") < size.decode_read_bytes("fp16")


def test_the_cli_prints_the_table_and_a_spec(magistral: Path) -> None:
    result = run_cli("plan", str(magistral), "--gpu", "L40S", "--context", "8192")
    assert result.returncode == 0, result.stderr
    assert "KV cache: 160 KiB per position" in result.stdout and "recommended: int8" in result.stdout
    assert "kv_budget_tokens" in result.stdout
    # Which card holds it, in each precision: 48 GB holds INT8, 80 GB BF16; 4-bit needs the fewest bytes
    rows = {line.split("|")[1].strip(): [int(n) for n in line.split("|")[2:-1]] for line in result.stdout.splitlines()
            if line.startswith("| ") and "GiB |" in line}
    assert list(rows) == ["16 GiB", "24 GiB", "48 GiB", "80 GiB"]
    assert all(fp16 <= int8 <= int4 for fp16, int8, int4 in rows.values())
    assert rows["48 GiB"][0] == 0 < rows["48 GiB"][1] and rows["80 GiB"][0] > 0
    unknown = run_cli("plan", str(magistral), "--gpu", "Z9000")
    assert unknown.returncode == 2 and "give --gpu-memory-gib and --gpu-bandwidth-gbs" in unknown.stderr


def test_the_figures_equal_the_bytes_in_the_tiny_graph_and_its_cache(built_repository: Path, appended_llm: Path,
                                                                    tiny_spec) -> None:
    from builder.cache import StageCache
    from builder.source.resolve import resolve_source
    from tests.conftest import CACHE

    size = read_size(resolve_source(tiny_spec.source, StageCache(CACHE)).checkpoint)
    llm = built_repository / "llm" / "1"
    graph = load_onnx(appended_llm)  # the exported graph (the served one adds GroupQueryAttention's rotary tables)
    weights = sum(int(np.prod(w.dims)) for w in graph.graph.initializer if w.data_type == onnx.TensorProto.FLOAT)
    assert abs(weights - size.llm_parameters) <= 0.01 * size.llm_parameters  # the graph's FP32 weights, +- constants
    runner = LanguageModelRunner(str(llm / "model.onnx"), ModelFacts.load(llm / "model_facts.json"))
    ids = np.arange(16, 16 + 40)
    seq = runner.start(ids, np.zeros((40, runner.facts.hidden_size), np.float32), np.zeros(40, bool),
                       SamplingParams(1))
    held = sum(kv.nbytes for kv in runner.cache_of(seq))  # FP32 here: twice the FP16 figure
    assert held == 40 * size.kv_bytes_per_token * 2


def test_the_figures_for_the_small_preset_equal_its_modules(tmp_path: Path) -> None:
    """The planner's counts for the `small` preset equal the parameters of the modules the preset builds (on the
    meta device: its checkpoint's headers are written from their state dicts, no weights are made)."""
    import torch
    from transformers import Mistral3ForConditionalGeneration

    from builder.families.mistral3 import build_audio_modules
    from builder.source.tiny import PRESETS

    config = PRESETS["small"]()
    with torch.device("meta"):
        model = Mistral3ForConditionalGeneration(config)
        audio_tower, audio_projector = build_audio_modules(config)
    tensors = {**{k: list(v.shape) for k, v in model.state_dict().items()},
               **{f"audio_tower.{k}": list(v.shape) for k, v in audio_tower.state_dict().items()},
               **{f"audio_projector.{k}": list(v.shape) for k, v in audio_projector.state_dict().items()}}
    checkpoint = write_headers_only(tmp_path / "small", tensors, shards=2)
    config.save_pretrained(checkpoint)  # the preset's own config.json over the 24B one

    def count(*modules: torch.nn.Module) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    size = read_size(checkpoint)
    text = config.text_config
    assert size.llm_parameters == count(model.model.language_model, model.lm_head)
    assert size.decode_parameters == size.llm_parameters - count(model.model.language_model.embed_tokens)
    assert size.encoder_parameters == {"vision_encoder": count(model.model.vision_tower, model.model.multi_modal_projector),
                                       "audio_encoder": count(audio_tower, audio_projector)}
    assert size.kv_bytes_per_token == 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 2
    assert (size.hidden_size, size.intermediate_size) == (text.hidden_size, text.intermediate_size)
