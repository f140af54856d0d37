"""The streamed LLM writer (builder.export.streamed) against PyTorch and against today's whole-graph quantizers, on
checkpoints written by transformers' own classes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import numpy_helper

from builder.compare import figures, run_onnxruntime
from builder.export.graph import graph_signature
from builder.export.parity import check_parity
from builder.export.recipes import ExportRecipe
from builder.export.streamed.writer import LinearWeight, StreamedLlm, write_streamed_llm
from builder.families import FAMILIES, family_for
from builder.errors import BuildError
from builder.quantize.agreement import FusedPrompt, RunnerScorer
from builder.quantize.awq import best_scales, search_scales
from builder.quantize.reference import TorchScorer
from builder.quantize.weight_only import NbitsWeights, QdqWeights, ScaledWeights, quantize_weights_nbits, quantize_weights_qdq
from builder.runtime.generation import LanguageModelRunner
from builder.source.checkpoint import check_checkpoint, load_checkpoint
from builder.source.tokenizer_files import serving_tokenizer
from builder.spec import LimitsSpec, LlmGateSpec
from tests.hf_checkpoints import write_mistral3_checkpoint, write_qwen2_audio_checkpoint, write_voxtral_checkpoint
from tests.hf_gemma3 import write_gemma3_checkpoint
from tests.hf_qwen25_omni import write_qwen25_omni_checkpoint
from tests.hf_qwen25_vl import write_qwen25_vl_checkpoint

LIMITS = LimitsSpec(max_context=256)
ATOL, RTOL = 1e-4, 1e-3  # ExportSpec's FP32 tolerances


def llm_recipe_of(checkpoint: Path, dtype: str) -> ExportRecipe:
    (recipe,) = family_for(checkpoint).recipes(load_checkpoint(checkpoint, dtype), LIMITS, ["llm"])
    return recipe


@pytest.fixture(scope="module")
def mistral3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mistral3_checkpoint(tmp_path_factory.mktemp("streamed") / "checkpoint")


@pytest.fixture(scope="module")
def mistral3_fp32(mistral3: Path, tmp_path_factory: pytest.TempPathFactory) -> StreamedLlm:
    return write_streamed_llm(mistral3, tmp_path_factory.mktemp("fp32"), "float32", limits=LIMITS)


def test_fp32_equals_pytorch_with_the_whole_exports_signature(mistral3: Path, mistral3_fp32: StreamedLlm) -> None:
    recipe = llm_recipe_of(mistral3, "float32")
    parity = check_parity(recipe, mistral3_fp32.path, 3, ATOL, RTOL)  # raises outside the tolerances
    assert parity.max_abs_error < ATOL
    inputs, outputs = graph_signature(mistral3_fp32.path)
    assert [s.name for s in inputs] == recipe.input_names and [s.name for s in outputs] == recipe.output_names
    assert {s.name: s.data_type for s in inputs}["past_key_values.2.value"] == "TYPE_FP32"
    assert mistral3_fp32.data_path.stat().st_size == mistral3_fp32.data_bytes > 0


def test_the_lm_head_is_a_matmul_unless_it_is_the_embedding_table(mistral3_fp32: StreamedLlm, tmp_path: Path) -> None:
    """A MatMul by the transposed weight: ONNX Runtime's CPU Gemm took ~18% longer on a lm_head. A lm_head tied to the
    embedding table (this Mistral-3 test checkpoint's) stays a Gemm: the table is stored once, as the lookup reads it."""
    tied = onnx.load(str(mistral3_fp32.path), load_external_data=False).graph
    (gemm,) = [n for n in tied.node if n.op_type == "Gemm"]
    (lookup,) = [n for n in tied.node if n.op_type == "Gather" and n.input[0] in {t.name for t in tied.initializer}]
    assert gemm.input[1] == lookup.input[0]
    checkpoint = write_mistral3_checkpoint(tmp_path / "untied", tie_word_embeddings=False)  # as Mistral Small's
    written = write_streamed_llm(checkpoint, tmp_path / "graph", "float32", limits=LIMITS)
    untied = onnx.load(str(written.path), load_external_data=False).graph
    assert "Gemm" not in {n.op_type for n in untied.node}
    (head,) = [n for n in untied.node if n.output[0] == "logits"]
    weights = {t.name: list(t.dims) for t in untied.initializer}
    assert head.op_type == "MatMul" and weights[head.input[1]][::-1] == weights[lookup.input[0]]  # [hidden, vocab]
    check_parity(llm_recipe_of(checkpoint, "float32"), written.path, 2, ATOL, RTOL)


def test_fp16_matches_pytorch_fp16_by_cosine(mistral3: Path, tmp_path: Path) -> None:
    written = write_streamed_llm(mistral3, tmp_path, "float16", limits=LIMITS)
    check_parity(llm_recipe_of(mistral3, "float16"), written.path, 2, ATOL, RTOL, cosine_gate=0.999)
    inputs, outputs = graph_signature(written.path)
    assert {s.name: s.data_type for s in inputs}["past_key_values.0.key"] == "TYPE_FP16"
    assert {s.name: s.data_type for s in outputs}["logits"] == "TYPE_FP32"


def _feeds(recipe: ExportRecipe) -> list[dict[str, np.ndarray]]:
    gen = torch.Generator().manual_seed(7)
    return [{name: tensor.numpy() for name, tensor in zip(recipe.input_names, recipe.sample_inputs(gen, variant), strict=True)}
            for variant in (1, 2)]


@pytest.mark.parametrize("weights", [NbitsWeights(4, 32), QdqWeights(8, None)], ids=["int4-matmulnbits", "int8-qdq"])
def test_quantized_equals_the_whole_graph_quantizer(mistral3: Path, mistral3_fp32: StreamedLlm, tmp_path: Path,
                                                    weights: NbitsWeights | QdqWeights) -> None:
    """Streamed INT4 / INT8 weights are what builder.quantize.weight_only makes of the FP32 graph, weight for weight."""
    written = write_streamed_llm(mistral3, tmp_path / "streamed", limits=LIMITS, weights=weights)
    assert written.precision == weights.precision
    whole = tmp_path / "whole.onnx"
    if isinstance(weights, QdqWeights):
        quantize_weights_qdq(mistral3_fp32.path, whole, weights.block_size, weights.bits)
    else:
        quantize_weights_nbits(mistral3_fp32.path, whole, weights.block_size, bits=weights.bits)
    recipe = llm_recipe_of(mistral3, "float32")
    feeds = _feeds(recipe)
    streamed = run_onnxruntime(written.path, feeds, recipe.output_names)
    reference = run_onnxruntime(whole, feeds, recipe.output_names)
    fp32 = run_onnxruntime(mistral3_fp32.path, feeds, recipe.output_names)
    for got, want, full in zip(streamed, reference, fp32, strict=True):
        np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-4, rtol=1e-4)
        assert not np.allclose(got["logits"], full["logits"], atol=1e-4)  # the weights were quantized


WRITERS = {  # every registered family's checkpoint, as its transformers classes write it
    "mistral3": write_mistral3_checkpoint, "voxtral": write_voxtral_checkpoint, "qwen2_audio": write_qwen2_audio_checkpoint,
    "gemma3": write_gemma3_checkpoint, "qwen2_5_omni_thinker": write_qwen25_omni_checkpoint,
    "qwen2_5_vl": write_qwen25_vl_checkpoint,
}


def test_every_family_has_a_streamed_parity_test() -> None:
    assert sorted(WRITERS) == sorted(FAMILIES)


@pytest.mark.parametrize("family", ["voxtral", "qwen2_audio", "qwen2_5_omni_thinker", "qwen2_5_vl"])
def test_every_family_streams_to_pytorchs_logits(family: str, tmp_path: Path) -> None:
    """Key names as each family's transformers classes save them; Qwen2.5's M-RoPE positions [3, B, S]."""
    checkpoint = WRITERS[family](tmp_path / "checkpoint")
    written = write_streamed_llm(checkpoint, tmp_path / "graph", "float32", limits=LIMITS)
    check_parity(llm_recipe_of(checkpoint, "float32"), written.path, 2, ATOL, RTOL)


def test_gemma3_sliding_and_global_layers(tmp_path: Path) -> None:
    """Two layer kinds stamped by the checkpoint's layer_types; image tokens attend both ways (the family's wrapper)."""
    checkpoint = write_gemma3_checkpoint(tmp_path / "checkpoint")
    written = write_streamed_llm(checkpoint, tmp_path / "graph", "float32", limits=LIMITS)
    check_parity(llm_recipe_of(checkpoint, "float32"), written.path, 3, ATOL, RTOL)


@pytest.mark.parametrize("family", sorted(WRITERS))
def test_layers_on_demand_compute_what_the_whole_model_computes(family: str, tmp_path: Path) -> None:
    """The build's load (the decoder's layers, embedding table and lm_head read from the shards while each runs):
    every component's recipe gives the whole load's outputs, and after a forward none of those holds its weights."""
    checkpoint = WRITERS[family](tmp_path / "checkpoint")
    whole, streamed = (check_checkpoint(checkpoint).load("float32", layers_on_demand=lazy) for lazy in (False, True))
    components = [c for c in ("vision_encoder", "audio_encoder", "llm")
                  if c == "llm" or getattr(whole.facts, {"vision_encoder": "image", "audio_encoder": "audio"}[c])]
    for expected, actual in zip(*(family_for(checkpoint).recipes(s, LIMITS, components) for s in (whole, streamed)),
                                strict=True):
        for variant in (1, 2):
            inputs = expected.sample_inputs(torch.Generator().manual_seed(variant), variant)
            with torch.no_grad():
                want, got = expected.module(*inputs), actual.module(*inputs)
            for w, g in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,),
                            strict=True):
                torch.testing.assert_close(g, w, atol=0, rtol=0)
    model = streamed.model
    read_on_demand = [*model.get_decoder().layers, model.get_input_embeddings(), model.get_output_embeddings()]
    assert all(p.is_meta for module in read_on_demand for p in module.parameters())
    # as from_pretrained leaves them (torch.export of an encoder specialized its batch on requires_grad=False)
    buffers = dict(whole.model.named_buffers())
    for name, buffer in streamed.model.named_buffers():
        assert buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name
    parameters = dict(whole.model.named_parameters(remove_duplicate=False))
    assert all(p.requires_grad == parameters[n].requires_grad
               for n, p in streamed.model.named_parameters(remove_duplicate=False) if not p.is_meta)
    held = {id(p) for p in model.parameters()} - {id(p) for module in read_on_demand for p in module.parameters()}
    assert held and not any(p.is_meta for p in model.parameters() if id(p) in held)  # the encoders and norms are loaded


@pytest.mark.parametrize("form", [NbitsWeights(4, 32), NbitsWeights(8, 32), QdqWeights(4, 32), QdqWeights(8, None)],
                         ids=["int4-matmulnbits", "int8-matmulnbits", "int4-qdq", "int8-qdq-per-channel"])
def test_a_large_weight_is_quantized_in_column_chunks(form: NbitsWeights | QdqWeights) -> None:
    """A 131k-token lm_head is 2 GB in FP32 (over protobuf's limit, which ORT's quantizer reads a weight through):
    each form converts and quantizes a few columns at a time, and gives the bytes of the whole weight at once."""
    stored = torch.randn(40, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # a Linear's [N, K]

    def written(chunk_bytes: int) -> tuple[list[str], list[tuple]]:
        node = onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="lm_head")
        nodes, tensors = dataclasses.replace(form, chunk_bytes=chunk_bytes).matmul(node, LinearWeight(stored))
        return [str(n) for n in nodes], [(t.name, list(t.dims), t.raw_data or numpy_helper.to_array(t).tobytes()) for t in tensors]

    assert written(64 * 4 * 7) == written(1 << 30)  # 7 columns a chunk; all at once


def test_a_sliding_window_shorter_than_the_context(tmp_path: Path) -> None:
    """Mistral's ``sliding_window`` (4096 in its config) below the build's context: the wrapper masks the window over a
    cache that keeps every position (a prefill, then decode steps past a window of 4, equal HF's own forward of the
    whole sequence), and the streamed graph equals the wrapper on samples 8-10 positions long."""
    checkpoint = write_mistral3_checkpoint(tmp_path / "checkpoint")
    config = json.loads((checkpoint / "config.json").read_text())
    config["text_config"]["sliding_window"] = 4
    (checkpoint / "config.json").write_text(json.dumps(config))
    source = load_checkpoint(checkpoint, "float32")
    (recipe,) = family_for(checkpoint).recipes(source, LIMITS, ["llm"])
    text = source.model.config.text_config
    ids = torch.randint(0, text.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
    past = [torch.zeros(1, text.num_key_value_heads, 0, text.head_dim) for _ in range(2 * text.num_hidden_layers)]
    with torch.no_grad():
        expected = source.model(input_ids=ids).logits[0]
        for start, end in [(0, 7), (7, 8), (8, 9), (9, 10), (10, 11)]:
            width = end - start
            logits, *past = recipe.module(ids[:, start:end], torch.zeros(1, width, text.hidden_size),
                                          torch.zeros(1, width, dtype=torch.bool), torch.ones(1, end, dtype=torch.long),
                                          torch.arange(start, end)[None], *past)
            torch.testing.assert_close(logits[0], expected[end - 1], atol=ATOL, rtol=RTOL)
            assert past[0].shape[2] == end  # present = past + new: nothing cropped
    written = write_streamed_llm(checkpoint, tmp_path / "graph", "float32", limits=LIMITS)
    check_parity(llm_recipe_of(checkpoint, "float32"), written.path, 3, ATOL, RTOL)


@pytest.mark.parametrize("family", sorted(WRITERS))
def test_the_gates_pytorch_reference_is_hfs_forward_and_the_served_graphs(family: str, tmp_path: Path) -> None:
    """The reference a quantized LLM is gated against (builder.quantize.reference: the layers-on-demand load, one
    forward over prompt + continuation): on text alone its logits are HF's own forward's at every position; with media
    embeddings (and M-RoPE positions that an image shifts) they are what the streamed FP32 graph gives when served,
    prefill then one decode step per continuation token."""
    checkpoint = WRITERS[family](tmp_path / "checkpoint")
    found = check_checkpoint(checkpoint)
    facts = found.read_facts()
    scorer = TorchScorer.load(checkpoint, serving_tokenizer(checkpoint), LIMITS)
    rng = np.random.default_rng(0)
    length = 9
    ids, continuation = (rng.integers(0, facts.vocab_size, n).astype(np.int64) for n in (length, 6))
    text = FusedPrompt(ids, np.zeros((length, facts.hidden_size), np.float32), np.zeros(length, bool))
    with torch.no_grad():
        hf = found.load("float32").model(input_ids=torch.from_numpy(np.concatenate([ids, continuation]))[None]).logits[0]
    np.testing.assert_allclose(scorer.score(text, continuation), hf[length - 1:].numpy(), atol=ATOL, rtol=RTOL)

    mask = np.zeros(length, bool)
    mask[2:5] = True  # one image of 3 tokens
    positions = None
    if facts.position_rows == 3:  # the image spans 2 positions in time, 2 x 2 in height and width
        positions = np.array([[0, 1, 2, 2, 2, 4, 5, 6, 7], [0, 1, 2, 3, 3, 4, 5, 6, 7], [0, 1, 2, 2, 3, 4, 5, 6, 7]])
    media = FusedPrompt(ids, rng.standard_normal((length, facts.hidden_size)).astype(np.float32), mask, positions)
    written = write_streamed_llm(checkpoint, tmp_path / "graph", "float32", limits=LIMITS)
    served = RunnerScorer(LanguageModelRunner(str(written.path), facts)).score(media, continuation)
    np.testing.assert_allclose(scorer.score(media, continuation), served, atol=ATOL, rtol=RTOL)


def test_awq_scales_cut_the_4_bit_error_where_activations_have_outlier_channels(tmp_path: Path) -> None:
    """A Linear whose inputs carry a few channels 30x larger than the rest (as LLM activations do): the searched
    scales (builder.quantize.awq) written as ScaledWeights (a Mul by 1/s, then MatMulNBits of W * s) reproduce its
    outputs under ONNX Runtime better than round to nearest of W; a decoder weight without scales is an error."""
    rng = np.random.default_rng(0)
    weight = torch.from_numpy(rng.standard_normal((64, 256)).astype(np.float32))  # [N, K] as a Linear stores it
    inputs = rng.standard_normal((300, 256)).astype(np.float32)
    inputs[:, [3, 77, 200]] *= 30
    scales = best_scales(weight, torch.from_numpy(inputs), 4, 32)
    assert not np.allclose(scales, 1.0)  # the search chose to scale
    name = "model.language_model.layers.0.mlp.down_proj.weight"
    np.savez(tmp_path / "awq.npz", **{name: scales})
    want = inputs @ weight.numpy().T

    def error(form: NbitsWeights | ScaledWeights, names: tuple[str, ...]) -> float:
        node = onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="down_proj")
        nodes, tensors = form.matmul(node, LinearWeight(weight, names))
        x, y = (onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [None, size])
                for n, size in (("x", 256), ("y", 64)))
        graph = onnx.helper.make_graph(nodes, "g", [x], [y], tensors)
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20),
                                                             onnx.helper.make_opsetid("com.microsoft", 1)])
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        (got,) = session.run(["y"], {"x": inputs})
        return float(np.mean((got - want) ** 2))

    plain = NbitsWeights(4, 32)
    scaled, rounded = error(ScaledWeights(plain, tmp_path / "awq.npz"), (name,)), error(plain, (name,))
    print(f"4-bit output MSE: AWQ scales {scaled:.4g}, round to nearest {rounded:.4g}")
    assert scaled < 0.8 * rounded
    with pytest.raises(BuildError, match="no AWQ scales for model.language_model.layers.1"):
        error(ScaledWeights(plain, tmp_path / "awq.npz"), ("model.language_model.layers.1.mlp.down_proj.weight",))


@pytest.mark.parametrize("family", sorted(WRITERS))
def test_awq_scales_are_searched_and_written_for_every_family(family: str, tmp_path: Path) -> None:
    """The search (in the PyTorch reference's forward) finds every decoder Linear of each family by the names the
    streamed writer gives its weights: the AWQ graph is written (a weight without scales would stop it), scales as
    Muls before the MatMuls, and in INT8 its logits pass the LLM gate's cosine against the checkpoint's."""
    checkpoint = WRITERS[family](tmp_path / "checkpoint")
    facts = check_checkpoint(checkpoint).read_facts()
    scorer = TorchScorer.load(checkpoint, serving_tokenizer(checkpoint), LIMITS)
    ids = np.random.default_rng(1).integers(0, facts.vocab_size, 24).astype(np.int64)
    prompt = FusedPrompt(ids, np.zeros((ids.size, facts.hidden_size), np.float32), np.zeros(ids.size, bool))
    scales = search_scales(scorer, [prompt], 8, 32, tmp_path / "awq.npz")
    written = write_streamed_llm(checkpoint, tmp_path / "graph", limits=LIMITS,
                                 weights=ScaledWeights(NbitsWeights(8, 32), scales))
    muls = [n for n in onnx.load(str(written.path), load_external_data=False).graph.node if n.name.endswith("_awq")]
    assert len(muls) == len(np.load(scales).files) > 0
    continuation = ids[:5]
    served = RunnerScorer(LanguageModelRunner(str(written.path), facts)).score(prompt, continuation)
    (found,) = figures([{"logits": served}], [{"logits": scorer.score(prompt, continuation)}], ["logits"])
    assert found.cosine >= LlmGateSpec().min_cosine
