"""Decode speed of this project's LLM graph against onnxruntime-genai's graph of the same checkpoint, on the same
ONNX Runtime, precision and thread count, run by run in alternation.

One Mistral decoder with seeded random weights (hidden 768, 12 layers, 12 heads / 4 KV heads, head_dim 64,
intermediate 3072, vocab 32768: 154M parameters, embedding and untied head included; HF's init, the head drawn wider, std
0.3, so greedy picks are clear-cut, and the special ids' rows zeroed so no sequence ever stops on EOS) is written
twice with the same weights: as the Mistral-3 checkpoint this project builds from (the tiny preset's vision tower
and tokenizer, FP32 safetensors) and as the text-only ``MistralForCausalLM`` directory onnxruntime-genai's model
builder takes (the state dict copied across: ``model.language_model`` -> ``model``, ``lm_head``). Then, per
precision:

- project: ``write_streamed_llm`` (FP32, or INT4 ``MatMulNBits`` block 32, accuracy level 4: int8 compute) with its
  attention fused as the ONNX Runtime targets serve it (``builder.compile.ort_llm_graph``: ``GroupQueryAttention``,
  the cache in one buffer per KV tensor updated in place), run by the server's ``LanguageModelRunner``; ``--appended``
  runs the exported graph instead (each step's KV appended with ``Concat``, the form the TensorRT target compiles);
- genai: ``python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu`` (its INT4 defaults are the same: block
  32, symmetric, accuracy level 4), run by ``og.Generator`` (``GroupQueryAttention``, the cache in a buffer of
  ``max_length`` updated in place); its ``genai_config.json`` gets the same ``intra_op_num_threads``.

onnxruntime-genai loads the ``libonnxruntime.so`` of the installed ``onnxruntime`` package, so both run on the very
same ONNX Runtime (1.31.1 here; ``pip install -e .[genai]`` adds onnxruntime-genai 0.18.0 without changing it).

Cells: precision FP32 / INT4 x prompt length 20 / 512 x batch 1 / 8 (8 different random prompts of the same
length: no padding on either side). A run prefills (not timed), then decodes ``warmup + steps`` steps; a timed step
is the greedy choice of each sequence's next token plus one batched decode call (``runner.decode`` /
``generator.generate_next_token``, which also does both). A cell is ``--repeats`` pairs of runs; for each pair, each
side starts a process of its own holding one session of its graph, as a server holds its one LLM session, runs once
and exits; which side starts (and runs) first alternates from pair to pair. On this machine the same graph decoded
6-12% slower in the process (or the session, within one process) made first than in one made after it, whichever
graph it held: with the order fixed, that alone would decide the comparison. Alternating pairs also spread the shared
machine's noise over both sides alike; a cell's figure is the median over its repeats of each run's median step.
In FP32 the greedy tokens of every sequence are compared between the two
(they should be identical: same weights, same arithmetic up to rounding order); in INT4 the two quantizers' output
need not agree and the share of identical tokens is shown for information only.

    python benchmarks/genai_compare.py              # full: 154M decoder, 6 repeats x 32 steps per cell (8-10 min on 2 cores)
    python benchmarks/genai_compare.py --threads 1  # the same on one intra-op thread each
    python benchmarks/genai_compare.py --quick      # smoke run: a 2-layer 256-wide decoder, 2 repeats x 8 steps (< 1 min)

``--threads`` defaults to every core of the machine. If anything else keeps a core busy, a step on every core waits
for the thread that shares it, and both sides' times grow and scatter (the 1-minute load average after each cell
is in the CSV): ``--threads 1`` is then less exposed to it.

Numbers: ``ms/step`` is one decode step of the whole batch; ``tok/s/seq`` is tokens per second per sequence
(1000 / ms/step; the batch's throughput is that x batch); ``project/genai`` is genai's ms/step over the project's:
above 1 the project decodes faster, below 1 genai does; ``paired`` is the median of the runs' pairwise ratios (genai
run k over project run k, run back to back), which other jobs starting or stopping between pairs move less; ``p10``
is the 10th percentile of every timed step of all the cell's runs, and its ratio: other jobs only ever add time to a
step, so on a busy machine this is the closer figure for the graphs themselves. Writes genai_compare.csv
(genai_compare_threadsN.csv for another thread count) into benchmarks/results/genai_compare/ (or --output) and prints
a markdown table; the .log files beside them are the printed output of the runs recorded there.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "genai_compare"
SPECIAL = 16  # the tiny preset's special ids: never predicted (their head rows are zero)


def write_checkpoints(work: Path, quick: bool) -> tuple[Path, Path, int]:
    """The Mistral-3 checkpoint (project) and the MistralForCausalLM one (genai) with the same weights; the decoder's
    parameter count (lm_head included, embedding too)."""
    import torch
    from transformers import Mistral3ForConditionalGeneration, MistralForCausalLM

    from builder.source.tiny import tiny_config, tiny_tokenizer, write_tokenizer_and_processor

    hidden, layers, heads, kv_heads, intermediate, vocab = (256, 2, 4, 2, 1024, 4096) if quick else (768, 12, 12, 4, 3072, 32768)
    config = tiny_config()
    del config.audio_config  # vision + text, as published Mistral-3 checkpoints are
    text = config.text_config
    for key, value in {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads, "head_dim": 64,
                       "num_key_value_heads": kv_heads, "intermediate_size": intermediate, "vocab_size": vocab,
                       "max_position_embeddings": 2048, "sliding_window": None, "tie_word_embeddings": False}.items():
        setattr(text, key, value)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
        model.lm_head.weight[:SPECIAL] = 0.0
    project_dir, genai_dir = work / "mistral3", work / "mistral"
    model.save_pretrained(project_dir, safe_serialization=True)
    write_tokenizer_and_processor(project_dir, config)

    causal = MistralForCausalLM(text).eval()
    causal.model.load_state_dict(model.model.language_model.state_dict(), strict=True)
    causal.lm_head.load_state_dict(model.lm_head.state_dict(), strict=True)
    ids = torch.tensor([[1, 100, 200, 300, 17, 18]])
    with torch.no_grad():  # the same weights: the same logits
        same = torch.allclose(model(input_ids=ids).logits, causal(input_ids=ids).logits, atol=1e-4)
    if not same:
        sys.exit("the MistralForCausalLM copy does not reproduce the Mistral-3 model's logits")
    causal.save_pretrained(genai_dir, safe_serialization=True)
    tiny_tokenizer().save_pretrained(genai_dir)  # tokenizer.json + tokenizer_config.json
    params = sum(p.numel() for p in causal.parameters())
    del model, causal
    gc.collect()
    return project_dir, genai_dir, params


def build_project(checkpoint: Path, output: Path, precision: str, max_context: int, appended: bool) -> Path:
    from builder.compile.ort_llm_graph import write_fused
    from builder.export.streamed.writer import write_streamed_llm
    from builder.quantize.weight_only import NbitsWeights
    from builder.spec import LimitsSpec

    limits = LimitsSpec(max_context=max_context)
    if precision == "int4":
        written = write_streamed_llm(checkpoint, output, limits=limits, weights=NbitsWeights(4, 32, 4))
    else:
        written = write_streamed_llm(checkpoint, output, "float32", limits=limits)
    return written.path if appended else write_fused(written.path, output / "in_place", written.attention, max_context)


def build_genai(checkpoint: Path, output: Path, precision: str, threads: int) -> Path:
    run = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(output),
                          "-p", precision, "-e", "cpu", "-c", str(output.parent / f"cache-{precision}")],
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
        sys.exit(f"onnxruntime-genai's builder failed ({precision}):\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    config_path = output / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=4))
    return output


def op_counts(path: Path) -> Counter:
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def project_run(runner, hidden: int, prompts: np.ndarray, warmup: int, steps: int) -> tuple[list[float], np.ndarray]:
    """Seconds per timed decode step, and the greedy tokens [B, warmup + steps + 1]."""
    from builder.runtime.generation import SamplingParams

    length = prompts.shape[1]
    params = SamplingParams(max_tokens=warmup + steps + 2)
    embeds, mask = np.zeros((length, hidden), np.float32), np.zeros(length, bool)
    sequences = [runner.start(p.astype(np.int64), embeds, mask, params) for p in prompts]
    times = []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        for seq in sequences:
            seq.tokens.append(int(np.argmax(seq.logits)))
        runner.decode(sequences)
        times.append(time.perf_counter() - started)
    tokens = np.array([[*seq.tokens, int(np.argmax(seq.logits))] for seq in sequences])
    return times[warmup:], tokens


def genai_run(model, prompts: np.ndarray, warmup: int, steps: int) -> tuple[list[float], np.ndarray]:
    """The same for onnxruntime-genai: append_tokens prefills and leaves the first token's logits, the first
    generate_next_token only chooses it; each later one runs a decode step, then chooses."""
    import onnxruntime_genai as og

    batch, length = prompts.shape
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length + warmup + steps + 2, batch_size=batch, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompts.astype(np.int32))
    generator.generate_next_token()
    tokens = [generator.get_next_tokens().copy()]
    times = []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        generator.generate_next_token()
        times.append(time.perf_counter() - started)
        tokens.append(generator.get_next_tokens().copy())
    del generator
    return times[warmup:], np.stack(tokens, axis=1).astype(np.int64)


def side_worker(side: str, path: str, checkpoint: str, threads: int, pipe: Connection) -> None:
    """One side's process: loads its one session, then answers each (prompts, warmup, steps) on ``pipe`` with
    (step seconds, greedy tokens) until it receives None."""
    sys.path.insert(0, str(ROOT))
    if side == "project":
        from builder.runtime.generation import LanguageModelRunner
        from builder.source.checkpoint import read_facts

        facts = read_facts(Path(checkpoint))
        runner = LanguageModelRunner(path, facts, intra_op_threads=threads)
        run = functools.partial(project_run, runner, facts.hidden_size)
    else:
        import onnxruntime_genai as og

        run = functools.partial(genai_run, og.Model(path))
    pipe.send("ready")
    while (job := pipe.recv()) is not None:
        pipe.send(run(*job))


class Side:
    """A side's worker process (``side_worker``), started and waited for."""

    def __init__(self, side: str, path: Path, checkpoint: Path, threads: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipe, theirs = context.Pipe()
        self.process = context.Process(target=side_worker, args=(side, str(path), str(checkpoint), threads, theirs),
                                       name=f"genai-compare-{side}")
        self.process.start()
        if self.pipe.recv() != "ready":
            sys.exit(f"the {side} worker did not start")

    def run(self, prompts: np.ndarray, warmup: int, steps: int) -> tuple[list[float], np.ndarray]:
        self.pipe.send((prompts, warmup, steps))
        return self.pipe.recv()

    def close(self) -> None:
        self.pipe.send(None)
        self.process.join()


def compare_tokens(project: np.ndarray, genai: np.ndarray) -> tuple[float, str]:
    """Share of identical tokens, and a word on the first difference."""
    same = project == genai
    if same.all():
        return 1.0, f"identical ({same.shape[0]} seq x {same.shape[1]} tokens)"
    row, col = map(int, np.argwhere(~same)[0])
    return float(same.mean()), f"differ: {same.mean():.0%} identical, first at seq {row} token {col}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2-layer 256-wide decoder, 2 repeats x 8 steps: a smoke run")
    parser.add_argument("--steps", type=int, help="timed decode steps per run; default 32, quick 8")
    parser.add_argument("--warmup", type=int, default=3, help="untimed decode steps at the start of each run")
    parser.add_argument("--repeats", type=int, help="runs of each side per cell, alternated; default 6, quick 2")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="intra-op threads of both")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int4"], choices=["fp32", "int4"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[20, 512])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--appended", action="store_true",
                        help="the project's exported graph (KV appended each step) instead of the served in-place one")
    parser.add_argument("--keep", type=Path, help="write the checkpoints and graphs here (default: a temporary directory)")
    args = parser.parse_args()
    steps = args.steps or (8 if args.quick else 32)
    repeats = args.repeats or (2 if args.quick else 6)
    max_context = 1024
    if max(args.contexts) + args.warmup + steps + 2 > max_context:
        sys.exit(f"a prompt of {max(args.contexts)} + {args.warmup + steps + 2} steps is over max_context {max_context}")

    import onnxruntime
    import onnxruntime_genai as og

    from builder.source.checkpoint import read_facts

    rows: list[dict[str, object]] = []
    notes: list[str] = []
    started = time.perf_counter()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="genai-compare.", dir=args.keep) as tmp:
        work = Path(tmp)
        project_ckpt, genai_ckpt, params = write_checkpoints(work, args.quick)
        facts = read_facts(project_ckpt)
        print(f"checkpoints written: {params / 1e6:.0f}M parameters ({time.perf_counter() - started:.0f} s)", flush=True)
        rng = np.random.default_rng(0)
        prompts = {n: rng.integers(SPECIAL, facts.vocab_size, (max(args.batches), n)) for n in args.contexts}
        for precision in args.precisions:
            project_path = build_project(project_ckpt, work / f"project-{precision}", precision, max_context,
                                         args.appended)
            genai_path = build_genai(genai_ckpt, work / f"genai-{precision}", precision, args.threads)
            genai_onnx = genai_path / json.loads((genai_path / "genai_config.json").read_text())["model"]["decoder"]["filename"]
            for side, path in (("project", project_path), ("genai", genai_onnx)):
                counts = op_counts(path)
                notes.append(f"{precision} {side} graph: {sum(counts.values())} nodes; "
                             + ", ".join(f"{op} {counts[op]}" for op in ("MatMul", "MatMulNBits", "Concat",
                                                                          "GroupQueryAttention", "Softmax", "Transpose")
                                         if counts[op]))
            print(f"{precision}: graphs built ({time.perf_counter() - started:.0f} s)", flush=True)
            graphs = {"project": (project_path, project_ckpt), "genai": (genai_path, genai_ckpt)}
            for context in args.contexts:
                for batch in args.batches:
                    batch_prompts = prompts[context][:batch]
                    project_ms, genai_ms, agreement, word = [], [], [], ""
                    project_steps, genai_steps = [], []  # every timed step of every run, ms
                    for repeat in range(repeats):
                        # a pair: a fresh process per side, started (and run) in the order that alternates: see the
                        # module's docstring
                        order = ("project", "genai") if repeat % 2 == 0 else ("genai", "project")
                        sides = {name: Side(name, *graphs[name], args.threads) for name in order}
                        runs = {name: sides[name].run(batch_prompts, args.warmup, steps) for name in order}
                        for side in sides.values():
                            side.close()
                        (times, project_tokens), (genai_times, genai_tokens) = runs["project"], runs["genai"]
                        project_ms.append(1000 * statistics.median(times))
                        project_steps += [1000 * t for t in times]
                        genai_ms.append(1000 * statistics.median(genai_times))
                        genai_steps += [1000 * t for t in genai_times]
                        share, said = compare_tokens(project_tokens, genai_tokens)
                        agreement.append(share)
                        word = word if word and share == 1.0 else said
                    p_ms, g_ms = statistics.median(project_ms), statistics.median(genai_ms)
                    p_fast, g_fast = float(np.percentile(project_steps, 10)), float(np.percentile(genai_steps, 10))
                    rows.append({
                        "precision": precision, "context": context, "batch": batch, "threads": args.threads,
                        "project_ms_per_step": round(p_ms, 2), "genai_ms_per_step": round(g_ms, 2),
                        "project_tok_s_per_seq": round(1000 / p_ms, 1), "genai_tok_s_per_seq": round(1000 / g_ms, 1),
                        "project_over_genai_speed": round(g_ms / p_ms, 3),
                        # the median of each alternated pair's ratio: steadier when other jobs come and go between pairs
                        "paired_speed_median": round(statistics.median(g / p for p, g in zip(project_ms, genai_ms)), 3),
                        # the 10th percentile of all steps: what each decodes at when nothing else takes its cores
                        "project_p10_ms": round(p_fast, 2), "genai_p10_ms": round(g_fast, 2),
                        "p10_speed": round(g_fast / p_fast, 3),
                        "project_runs_ms": " ".join(f"{v:.1f}" for v in project_ms),
                        "genai_runs_ms": " ".join(f"{v:.1f}" for v in genai_ms),
                        "greedy_tokens": word, "same_token_share": round(min(agreement), 4),
                        "load_avg_1m": round(os.getloadavg()[0], 2),  # other jobs on the machine (this one adds ~threads)
                    })
                    print({k: rows[-1][k] for k in ("precision", "context", "batch", "project_ms_per_step",
                                                    "genai_ms_per_step", "project_over_genai_speed", "greedy_tokens")},
                          flush=True)
            for leftover in (work / f"project-{precision}", genai_path, work / f"cache-{precision}"):
                subprocess.run(["rm", "-rf", str(leftover)], check=False)  # disk: one precision's graphs at a time

    args.output.mkdir(parents=True, exist_ok=True)
    name = "genai_compare.csv" if args.threads == len(os.sched_getaffinity(0)) else f"genai_compare_threads{args.threads}.csv"
    name = name.replace(".csv", "_appended.csv") if args.appended else name
    with (args.output / name).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{'quick smoke run: ' if args.quick else ''}Mistral decoder, {params / 1e6:.0f}M parameters "
          f"({facts.num_layers} layers, hidden {facts.hidden_size}, vocab {facts.vocab_size}); ONNX Runtime "
          f"{onnxruntime.__version__}, onnxruntime-genai {og.__version__}, {args.threads} intra-op threads each; "
          f"per cell {repeats} alternated runs of each x median of {steps} steps (after {args.warmup}); "
          f"{time.perf_counter() - started:.0f} s in all; 1-minute load average {min(r['load_avg_1m'] for r in rows)}"
          f"-{max(r['load_avg_1m'] for r in rows)} after the cells")
    for note in notes:
        print(note)
    fp32 = [r for r in rows if r["precision"] == "fp32"]
    if fp32:
        matched = all(r["same_token_share"] == 1.0 for r in fp32)
        print(f"FP32 greedy tokens, project vs genai, every run of every cell: {'IDENTICAL' if matched else 'NOT identical'}")
    print("\n| precision | context | batch | project ms/step | genai ms/step | project tok/s/seq | genai tok/s/seq "
          "| project/genai speed | paired | p10 ms project / genai | p10 speed | greedy tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['precision']} | {r['context']} | {r['batch']} | {r['project_ms_per_step']:.1f} | {r['genai_ms_per_step']:.1f} "
              f"| {r['project_tok_s_per_seq']:.1f} | {r['genai_tok_s_per_seq']:.1f} | {r['project_over_genai_speed']:.2f}x "
              f"| {r['paired_speed_median']:.2f}x | {r['project_p10_ms']:.1f} / {r['genai_p10_ms']:.1f} | {r['p10_speed']:.2f}x "
              f"| {r['greedy_tokens']} |")


if __name__ == "__main__":
    main()
