"""The KV cache held once and written in place: the LLM graph's attention fused into ONNX Runtime's
GroupQueryAttention (builder.compile.ort_llm_graph) and the runner's one buffer per KV tensor (runtime.kv_slots),
on checkpoints written by transformers' own classes."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from builder.compile.ort_llm_graph import check_fused, fuse_attention, unfusable, write_fused
from builder.errors import BuildError
from builder.export.graph import load_exported
from builder.export.streamed import record_quantized_llm
from builder.export.streamed.writer import write_streamed_llm
from builder.quantize.agreement import FusedPrompt, RunnerScorer
from builder.quantize.reference import TorchScorer
from builder.quantize.weight_only import NbitsWeights
from builder.runtime.generation import LanguageModelRunner, SamplingParams
from builder.runtime.kv_slots import KvSlots
from builder.runtime.model_facts import ModelFacts
from builder.runtime.prefix_cache import PrefixCache
from builder.source.checkpoint import check_checkpoint
from builder.source.tokenizer_files import serving_tokenizer
from builder.spec import ExportSpec, LimitsSpec
from tests.hf_checkpoints import write_mistral3_checkpoint
from tests.test_streamed_llm import WRITERS

LIMITS = LimitsSpec(max_context=256)
ATOL, RTOL = ExportSpec().atol, ExportSpec().rtol


def layout_of(checkpoint: Path, tmp_path: Path):
    """The attention layout the export stage records for this checkpoint's LLM."""
    (tmp_path / "recorded").mkdir(parents=True)
    record_quantized_llm(checkpoint, tmp_path / "recorded", ExportSpec(), LIMITS)
    return load_exported(tmp_path / "recorded").attention


# The test checkpoints that keep the appended cache, and why: Gemma 3's image tokens attend both ways; the Qwen2.5-VL
# test checkpoint's odd head_dim (20) is no multiple of 8. Their builds are served (and checked against HF) as exported.
APPENDED = {"gemma3": None, "qwen2_5_vl": "head_dim 20 is not a multiple of 8"}


def test_every_family_says_whether_its_attention_fuses(tmp_path: Path) -> None:
    """Every family's decoder is causal self-attention GroupQueryAttention computes, except Gemma 3's."""
    for family, write in WRITERS.items():
        checkpoint = write(tmp_path / family)
        layout = layout_of(checkpoint, tmp_path / f"{family}-layout")
        if family == "gemma3":
            assert layout is None
            continue
        facts = check_checkpoint(checkpoint).read_facts()
        assert (layout.num_kv_heads, layout.head_dim, len(layout.windows)) == (facts.num_kv_heads, facts.head_dim, facts.num_layers)
        reason = unfusable(layout)
        assert (reason is None) == (family not in APPENDED) and (APPENDED.get(family) or "") in (reason or "")


@pytest.mark.parametrize("family", sorted(set(WRITERS) - set(APPENDED)))
def test_the_in_place_graph_serves_what_the_checkpoint_computes(family: str, tmp_path: Path) -> None:
    """Fused, every family's streamed FP32 graph gives what the appended one gives over prefills and ragged decode
    steps, and served by the runner (media embeddings, M-RoPE positions an image shifts, then one decode step per
    continuation token) it equals the gates' PyTorch reference of the checkpoint (HF's own modules)."""
    checkpoint = WRITERS[family](tmp_path / "checkpoint")
    facts = check_checkpoint(checkpoint).read_facts()
    written = write_streamed_llm(checkpoint, tmp_path / "graph", "float32", limits=LIMITS)
    fused = write_fused(written.path, tmp_path / "fused", layout_of(checkpoint, tmp_path), LIMITS.max_context)
    check = check_fused(written.path, fused, facts, ATOL, RTOL, None)
    assert check.failure is None, check.summary()
    nodes = onnx.load(str(fused), load_external_data=False).graph.node
    ops = {n.op_type for n in nodes}
    assert {"GroupQueryAttention", "SimplifiedLayerNormalization"} <= ops and "Pow" not in ops
    rotary = {onnx.helper.get_attribute_value(a) for n in nodes if n.op_type == "GroupQueryAttention"
              for a in n.attribute if a.name == "do_rotary"}
    assert rotary == {int(facts.position_rows == 1)}  # M-RoPE's three position rows keep the graph's own rotation
    # The writer writes q, k and v as one MatMul (Qwen's biases as one Add), split back, where GroupQueryAttention
    # rotates them itself (not M-RoPE's); it takes them packed straight from that, and no Split is left. Gate and up
    # stay two MatMuls
    def packed_splits(graph_nodes) -> list[onnx.NodeProto]:
        return [n for n in graph_nodes if n.op_type == "Split" and n.name.endswith("/packed/split")]

    written_nodes = onnx.load(str(written.path), load_external_data=False).graph.node
    packs = facts.position_rows == 1
    splits = packed_splits(written_nodes)
    assert len(splits) == packs * facts.num_layers and all(len(n.output) == 3 for n in splits)
    assert sum(n.op_type == "Add" and n.name.endswith("/packed/bias") for n in written_nodes) == \
        facts.num_layers * (packs and family == "qwen2_audio")
    assert {not n.input[1] for n in nodes if n.op_type == "GroupQueryAttention"} == {packs}  # k, v in the query's input
    assert not packed_splits(nodes)

    rng = np.random.default_rng(0)
    length = 9
    ids, continuation = (rng.integers(0, facts.vocab_size, n).astype(np.int64) for n in (length, 6))
    mask = np.zeros(length, bool)
    mask[2:5] = True
    positions = None
    if facts.position_rows == 3:
        positions = np.array([[0, 1, 2, 2, 2, 4, 5, 6, 7], [0, 1, 2, 3, 3, 4, 5, 6, 7], [0, 1, 2, 2, 3, 4, 5, 6, 7]])
    media = FusedPrompt(ids, rng.standard_normal((length, facts.hidden_size)).astype(np.float32), mask, positions)
    runner = LanguageModelRunner(str(fused), facts)
    assert runner.in_place
    served = RunnerScorer(runner).score(media, continuation)
    reference = TorchScorer.load(checkpoint, serving_tokenizer(checkpoint), LIMITS).score(media, continuation)
    np.testing.assert_allclose(reference, served, atol=ATOL, rtol=RTOL)


def test_a_sliding_window_is_groupqueryattentions_local_window(tmp_path: Path) -> None:
    """Mistral's sliding window (4 here, shorter than both prompts) as GroupQueryAttention's ``local_window_size``:
    the fused graph equals the appended one, which equals HF's forward (tests/test_streamed_llm.py); one position
    off and it would not."""
    checkpoint = write_mistral3_checkpoint(tmp_path / "checkpoint")
    config = json.loads((checkpoint / "config.json").read_text())
    config["text_config"]["sliding_window"] = 4
    (checkpoint / "config.json").write_text(json.dumps(config))
    facts = check_checkpoint(checkpoint).read_facts()
    layout = layout_of(checkpoint, tmp_path)
    assert set(layout.windows) == {4}
    written = write_streamed_llm(checkpoint, tmp_path / "graph", "float32", limits=LIMITS)
    fused = write_fused(written.path, tmp_path / "fused", layout, LIMITS.max_context)
    check = check_fused(written.path, fused, facts, ATOL, RTOL, None)
    assert check.failure is None, check.summary()
    wider = write_fused(written.path, tmp_path / "wider", type(layout)(**{**layout.__dict__, "windows": (5,) * len(layout.windows)}),
                        LIMITS.max_context)
    assert check_fused(written.path, wider, facts, ATOL, RTOL, None).failure is not None


def test_fp16_and_4_bit_graphs_fuse(tmp_path: Path) -> None:
    """The fusion reads the graph's contract, not its weights' form: an FP16 graph and a MatMulNBits one (both by
    cosine: the 4-bit MatMuls quantize their activations; the build judges those by the LLM gate's)."""
    checkpoint = write_mistral3_checkpoint(tmp_path / "checkpoint")
    facts = check_checkpoint(checkpoint).read_facts()
    layout = layout_of(checkpoint, tmp_path)
    half = write_streamed_llm(checkpoint, tmp_path / "fp16", "float16", limits=LIMITS)
    check = check_fused(half.path, write_fused(half.path, tmp_path / "fp16-fused", layout, LIMITS.max_context), facts, ATOL, RTOL,
                        ExportSpec().fp16_min_cosine)
    assert check.failure is None, check.summary()
    assert LanguageModelRunner(str(tmp_path / "fp16-fused" / "model.onnx"), facts).kv_dtype == np.float16
    int4 = write_streamed_llm(checkpoint, tmp_path / "int4", limits=LIMITS, weights=NbitsWeights(4, 32))
    check = check_fused(int4.path, write_fused(int4.path, tmp_path / "int4-fused", layout, LIMITS.max_context), facts, ATOL, RTOL,
                        0.999)  # tighter than the build's (the LLM gate's 0.98) on this small checkpoint
    assert check.failure is None, check.summary()


def test_a_graph_whose_attention_is_not_the_known_shape_is_refused(tmp_path: Path) -> None:
    checkpoint = write_mistral3_checkpoint(tmp_path / "checkpoint")
    written = write_streamed_llm(checkpoint, tmp_path / "graph", "float32", limits=LIMITS)
    model = onnx.load(str(written.path), load_external_data=False)
    concat = next(n for n in model.graph.node if n.output[0] == "present.0.key")
    concat.op_type = "Sum"  # no longer the past + new Concat
    with pytest.raises(BuildError, match="present.0.key is not Concat"):
        fuse_attention(model, layout_of(checkpoint, tmp_path))


def test_the_repository_says_how_its_kv_cache_is_held(built_repository: Path) -> None:
    """The manifest and the build report name the served form and the figures of its check against the exported one."""
    llm = json.loads((built_repository / "manifest.json").read_text())["components"]["llm"]
    assert llm["kv_cache"].startswith("in place (GroupQueryAttention") and llm["kv_cache"].endswith(": pass")
    assert f"LLM KV cache: {llm['kv_cache']}." in (built_repository / "build_report.md").read_text()


def test_the_runner_batches_any_sequences_in_any_order_like_the_appended_cache(built_repository: Path,
                                                                            appended_llm: Path) -> None:
    """Sequences arrive, leave (one dropped without retire: its row frees when it is collected) and change order
    between steps, prompts longer than the first capacity (256) grow it; every token and logit as the appended
    graph gives them. A prefix-cache hit continues in place."""
    directory = built_repository / "llm" / "1"
    facts = ModelFacts.load(directory / "model_facts.json")
    in_place, appended = LanguageModelRunner(str(directory / "model.onnx"), facts), LanguageModelRunner(str(appended_llm), facts)
    assert in_place.in_place and not appended.in_place
    rng = np.random.default_rng(1)
    prompts = [rng.integers(8, facts.vocab_size, n) for n in (9, 3, 300, 40)]

    def inputs(ids):
        return ids, np.zeros((ids.size, facts.hidden_size), np.float32), np.zeros(ids.size, bool)

    def run(runner: LanguageModelRunner) -> list[list[np.ndarray]]:
        sequences = [runner.start(*inputs(p), SamplingParams(64)) for p in prompts]
        logits = [[s.logits.copy()] for s in sequences]
        for step in range(12):
            for seq in sequences:
                if seq is not None:
                    seq.next_token()
            batch = ([sequences[0], sequences[2], sequences[3]] if step < 4 else [sequences[3], sequences[0]]
                     if step < 8 else [sequences[0], sequences[1], sequences[3]])
            if step == 4:
                sequences[2] = None  # dropped: its client went away
                gc.collect()
            runner.decode(batch)
            for out, seq in zip(logits, sequences):
                if seq is not None and seq in batch:
                    out.append(seq.logits.copy())
        return logits

    for got, expected in zip(run(in_place), run(appended)):
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL)
    assert in_place.slots.capacity == 512 and in_place.slots.rows == 4

    cached = LanguageModelRunner(str(directory / "model.onnx"), facts, prefix_cache=PrefixCache(1 << 24))
    first = rng.integers(8, facts.vocab_size, 20)
    list(cached.generate(*inputs(first), SamplingParams(5)))
    second = np.concatenate([first, rng.integers(8, facts.vocab_size, 6)])
    assert list(cached.generate(*inputs(second), SamplingParams(8))) == list(appended.generate(*inputs(second), SamplingParams(8)))
    assert cached.prefix_cache.hits == 1


def test_kv_slots_move_rows_and_free_them() -> None:
    slots = KvSlots(["k", "v"], kv_heads=2, head_dim=3, dtype=np.float32, rows=2, capacity=4)

    class Owner:
        pass

    a, b, c = Owner(), Owner(), Owner()
    for owner, value in ((a, 1.0), (b, 2.0)):
        row = slots.claim(owner, 3)
        slots.write(row, [np.full((2, 3, 3), value, np.float32)] * 2)
    slots.arrange([b, a])
    assert slots.row_of(b) == 0 and slots.buffers["k"][0, :, :3].min() == 2.0 and slots.buffers["v"][1, :, :3].max() == 1.0
    assert slots.claim(c, 9) == 2 and slots.rows == 4 and slots.capacity == 16  # grown: rows doubled, capacity to fit
    assert slots.buffers["k"][1, :, :3].max() == 1.0  # kept through the growth
    del a
    gc.collect()
    assert slots.claim(Owner(), 1) == 1  # the collected owner's row
