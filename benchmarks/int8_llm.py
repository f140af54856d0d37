"""The LLM in INT8 and 4-bit on this CPU: decode speed, size and teacher-forced agreement vs FP32, and the
memory-bandwidth bound of decode at batch 1.

A Mistral decoder of realistic but CPU-friendly size (hidden 768, 12 layers, 12 heads / 4 KV heads,
intermediate 3072, vocab 32768: about 154M parameters), built with the same wrappers, recipe and
export as the build, quantized by the build's ``quantize_weights_nbits`` (block-wise ``MatMulNBits``,
the spec's default block size) and run by the server's ``LanguageModelRunner``.

Its weights are trained, briefly, on real text, so its next-token distributions are peaked as a
real model's are: from HF's own initialisation, AdamW on byte-level windows of this project's
README (``--train-steps``, seeded). Random weights give nearly flat distributions where any
rounding flips the argmax, which measures nothing about a real model (scaling the head was tried:
it scales the quantization error with the logits, and agreement does not move).

Prompts: the real text of data/calibration/prompts.txt in the server's [INST] layout, tokenized by
the tiny preset's byte-level tokenizer; its 272 ids are the first ids of the larger vocab, so the
prompts are real text while the model predicts over all 32768 ids. Weight-only INT8 is not
calibrated, so every prompt is held out. Batch 1 decodes one prompt; batch 8 decodes 8 prompts of
different lengths in one ``decode`` call per step, left-padded as the server batches them (ms/token
there: a step's time / 8). Agreement and logit cosine (the lowest over all positions) are teacher-forced
over 32 positions of a fixed continuation, the next prompt's text (builder.quantize.agreement, as the build's LLM gate).

    python benchmarks/int8_llm.py            # full: 128 steps per batch size (minutes; keep the machine quiet)
    python benchmarks/int8_llm.py --quick    # smoke run: a small 2-layer decoder, few steps, little training

Writes llm.csv and llm.png into benchmarks/results/int8/ (or --output) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import Mistral3ForConditionalGeneration

from builder.bench.bounds import read_bandwidth
from builder.bench.report import machine
from builder.export.onnx_export import export_graph
from builder.export.recipes import llm_recipe
from builder.quantize.agreement import POSITIONS, FusedPrompt, RunnerScorer, agreement, score_all
from builder.quantize.weight_only import quantize_weights_nbits
from builder.runtime.generation import LanguageModelRunner, SamplingParams
from builder.runtime.model_facts import ModelFacts
from builder.source.checkpoint import SourceModel, read_facts
from builder.source.tiny import tiny_config, tiny_tokenizer
from builder.spec import ExportSpec, LimitsSpec, QuantizeSpec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "int8"
PROMPTS = ROOT / "data" / "calibration" / "prompts.txt"
TRAINING_TEXT = ROOT / "README.md"  # never the held-out prompts
BATCH = 8
WINDOW = 128  # training tokens per sequence


@dataclass(frozen=True)
class Row:
    variant: str
    mb: float
    batch1_ms: float  # per token
    batch8_ms: float  # per token: a step of 8 sequences / 8
    cosine: float  # logits vs FP32, the lowest over the teacher-forced positions
    agreement: float  # teacher-forced: share of positions picking FP32's next token


def build_source(quick: bool, directory: Path, train_steps: int) -> SourceModel:
    """The tiny preset's model with a bigger decoder, trained on text; facts read back as the build reads a checkpoint."""
    hidden, layers, heads, kv_heads, intermediate, vocab = (256, 2, 4, 2, 512, 4096) if quick else (768, 12, 12, 4, 3072, 32768)
    config = tiny_config()
    for key, value in dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, head_dim=64,
                           num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab).items():
        setattr(config.text_config, key, value)
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(config)
    train_on_text(model, train_steps)
    model.save_pretrained(directory)  # the facts are read as from any checkpoint, which has its weights
    tiny_tokenizer().save_pretrained(directory)
    return SourceModel(directory, model, read_facts(directory))  # the preset's own tokenizer.json


def train_on_text(model: Mistral3ForConditionalGeneration, steps: int, batch: int = 8, lr: float = 1e-3) -> None:
    """AdamW on random windows of TRAINING_TEXT, next-token loss, the decoder and head only; prints the loss."""
    ids = torch.tensor(tiny_tokenizer().encode(TRAINING_TEXT.read_text(), add_special_tokens=False))
    generator = torch.Generator().manual_seed(0)
    # The decoder and the head (dict: once each, should the head share the embedding table).
    params = list({id(p): p for p in (*model.model.language_model.parameters(), *model.lm_head.parameters())}.values())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    losses: list[float] = []
    with tqdm(range(steps), desc="training on text", unit="step") as progress:
        for _ in progress:
            starts = torch.randint(0, ids.numel() - WINDOW - 1, (batch,), generator=generator)
            windows = torch.stack([ids[s : s + WINDOW] for s in starts.tolist()])
            loss = model(input_ids=windows, labels=windows).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            progress.set_postfix(loss=f"{statistics.mean(losses[-10:]):.2f}")
    model.eval()
    if losses:
        print(f"trained {steps} steps of {batch} x {WINDOW} tokens: loss {losses[0]:.2f} -> {statistics.mean(losses[-10:]):.2f} nats/token")


def held_out_prompts(facts: ModelFacts) -> list[FusedPrompt]:
    tokenizer = tiny_tokenizer()
    bos, inst, inst_end = tokenizer.convert_tokens_to_ids(["<s>", "[INST]", "[/INST]"])
    prompts = []
    for text in filter(None, map(str.strip, PROMPTS.read_text().splitlines())):  # Mistral's layout, text only
        ids = np.array([bos, inst, *tokenizer.encode(text, add_special_tokens=False), inst_end], np.int64)
        prompts.append(FusedPrompt(ids, np.zeros((ids.size, facts.hidden_size), np.float32), np.zeros(ids.size, bool)))
    return prompts


def decode_ms(runner: LanguageModelRunner, prompts: list[FusedPrompt], steps: int, warmup: int) -> float:
    """Median ms per decode step of ``prompts`` decoded together, after ``warmup`` steps."""
    params = SamplingParams(max_tokens=warmup + steps + 1)
    sequences = [runner.start(p.input_ids, p.embeds, p.mask, params) for p in prompts]
    times = []
    for _ in range(warmup + steps):
        for seq in sequences:
            seq.next_token()
        start = time.perf_counter()
        runner.decode(sequences)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[warmup:])


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), layout="tight")
    x, width = np.arange(2), 0.8 / len(rows)
    for i, row in enumerate(rows):
        label = f"{row.variant} ({row.mb:.0f} MB, agreement {row.agreement:.0%})"
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, [row.batch1_ms, row.batch8_ms], width, label=label)
    ax.set_xticks(x, ["batch 1", f"batch {BATCH}"])
    ax.set(ylabel="median decode ms/token", title="LLM decode: FP32 vs weight-only INT8")
    ax.legend()
    fig.savefig(path, dpi=100)


def measure(source: SourceModel, directory: Path, prompts: list[FusedPrompt], steps: int) -> list[Row]:
    """FP32 and the build's two weight-only INT8 rungs: int8 compute (accuracy_level 4), float compute (0)."""
    fp32 = export_graph(llm_recipe(source, LimitsSpec(max_context=512)), directory, ExportSpec(parity_samples=1, atol=1e-3, rtol=1e-2)).path
    reference = LanguageModelRunner(str(fp32), source.facts)
    warmup = max(2, steps // 16)
    # Each prompt followed by the next one's text (the build's gates feed a fixed continuation the same way).
    continuations = [np.resize(prompts[(i + 1) % len(prompts)].input_ids[2:-1], POSITIONS - 1) for i in range(len(prompts))]
    variants = [("fp32", fp32, reference, 1.0, 1.0)]
    for label, bits, level in (("int8, int8 compute", 8, 4), ("int8, float compute", 8, 0), ("4-bit, int8 compute", 4, 4)):
        path = directory / f"int{bits}-level{level}.onnx"
        quantize_weights_nbits(fp32, path, QuantizeSpec().llm_block_size, accuracy_level=level, bits=bits)
        runner = LanguageModelRunner(str(path), source.facts)
        found = agreement(score_all(RunnerScorer(reference), prompts, continuations),
                          score_all(RunnerScorer(runner), prompts, continuations))
        variants.append((label, path, runner, found.logits.cosine, found.agreement))
    return [Row(variant, path.stat().st_size / 1e6, decode_ms(runner, prompts[:1], steps, warmup),
                decode_ms(runner, prompts[:BATCH], steps, warmup) / BATCH, cos, agree)
            for variant, path, runner, cos, agree in variants]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small 2-layer decoder and few steps: a smoke run")
    parser.add_argument("--steps", type=int, help="timed decode steps per batch size; default 128, quick 12")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where llm.csv and llm.png go")
    parser.add_argument("--train-steps", type=int, help="training steps on text before quantizing; default 150, quick 20")
    args = parser.parse_args()
    steps = args.steps or (12 if args.quick else 128)
    with tempfile.TemporaryDirectory() as tmp:
        source = build_source(args.quick, Path(tmp), args.train_steps if args.train_steps is not None else 20 if args.quick else 150)
        decoder = source.model.model.language_model
        params = sum(p.numel() for p in decoder.parameters()) + source.model.lm_head.weight.numel()
        prompts = held_out_prompts(source.facts)
        rows = measure(source, Path(tmp), prompts, steps)
    args.output.mkdir(parents=True, exist_ok=True)
    with (args.output / "llm.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "MB", "batch1_ms_per_token", "batch8_ms_per_token", "logits_cosine", "agreement"])
        writer.writerows([r.variant, f"{r.mb:.2f}", f"{r.batch1_ms:.2f}", f"{r.batch8_ms:.2f}", f"{r.cosine:.5f}",
                          f"{r.agreement:.4f}"] for r in rows)
    plot(rows, args.output / "llm.png")
    facts, base = source.facts, rows[0]
    print(f"\n{'quick smoke run: ' if args.quick else ''}Mistral decoder, {params / 1e6:.0f}M parameters "
          f"({facts.num_layers} layers, hidden {facts.hidden_size}, vocab {facts.vocab_size}); median of {steps} decode steps; "
          f"teacher-forced over {len(prompts)} prompts x 32 positions")
    for key, value in machine().items():
        print(f"{key}: {value}")
    threads = len(os.sched_getaffinity(0))
    single, every = read_bandwidth(1) * 1e9, read_bandwidth(threads) * 1e9
    # A decode step reads every weight once, except the embedding table: its Gather reads one row.
    embedding_mb = facts.vocab_size * facts.hidden_size * 4 / 1e6
    print(f"read bandwidth (numpy sums over 1 GB, median of 5): {single / 1e9:.1f} GB/s one thread, "
          f"{every / 1e9:.1f} GB/s on {threads} threads (ONNX Runtime decodes on all cores)")
    print("\n| graph | weight MB read per token | tokens/s b1 | tokens/s b8 | b1 as a share of the bound (bandwidth / bytes per token) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        per_token = r.mb - embedding_mb
        bound = every / (per_token * 1e6)
        print(f"| {r.variant} | {per_token:.0f} | {1000 / r.batch1_ms:.1f} | {1000 / r.batch8_ms:.1f} | "
              f"{1000 / r.batch1_ms / bound:.0%} (bound {bound:.1f} tokens/s) |")
    print("\n| graph | size MB (vs FP32) | batch 1 ms/token | batch 8 ms/token | speed-up b1 / b8 | logits cos | agreement |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r.variant} | {r.mb:.1f} ({r.mb / base.mb:.0%}) | {r.batch1_ms:.1f} | {r.batch8_ms:.1f} | "
              f"{base.batch1_ms / r.batch1_ms:.2f}x / {base.batch8_ms / r.batch8_ms:.2f}x | {r.cosine:.5f} | {r.agreement:.1%} |")


if __name__ == "__main__":
    main()
