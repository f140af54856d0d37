"""A large checkpoint built as a user builds it, per LLM precision: peak RAM, time, disk, the gates' figures and
batch-1 decode against this machine's read bound; ``--serve``: the repository served by tritonserver, its answers
against the same graphs run in this process.

Each build is ``python -m builder build --checkpoint DIR --set components.llm.precision=P`` in a child process, so
its peak resident memory is the build's own, against the checkpoint's BF16 bytes (issue 27's targets: at most 0.6x
for INT4, 0.85x for INT8)::

    python benchmarks/write_large_checkpoint.py /tmp/ckpt6b --params 6e9
    python benchmarks/build_large.py /tmp/ckpt6b --precisions int4 int8 --serve --open-gates

``--open-gates``: a checkpoint of random weights gives near-uniform logits whose argmax any rounding flips, so its
4-bit rungs fail the LLM gate and the ladder walks to FP32 (a 6B FP32 graph needs 4 bytes a parameter); the flag
sets the LLM gate's cosine to 0.01 and the pipeline gate's agreement to 0 (reported, not gated) so the first rung is
built; the figures the gates measured are still reported.
The decode is measured as the server runs it: in a child process with the server's allocator setting (huge pages
for the weights, ``builder.serve.tritonserver.ALLOCATOR_TUNABLE``), the read bound measured in that process too.
Writes build_large.csv into benchmarks/results/build_large/ (or --output) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "build_large"
OPEN_GATES = ("quantize.llm_gate.min_cosine=0.01", "quantize.pipeline_gate.min_agreement=0")
PROMPT = "Describe a harbour town at dawn in three sentences."


def build(checkpoint: Path, precision: str, work: Path, open_gates: bool) -> dict[str, object]:
    """The build in a child process: its wall time, peak RSS (``wait4``'s, the child's own) and what it printed."""
    output, cache = work / f"repo-{precision}", work / f"cache-{precision}"
    settings = [f"components.llm.precision={precision}", *(OPEN_GATES if open_gates else ())]
    command = [sys.executable, "-m", "builder", "build", "--checkpoint", str(checkpoint), "--output", str(output),
               "--cache", str(cache), *(arg for s in settings for arg in ("--set", s))]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed = child.stdout.read() if child.stdout else ""
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"build {precision} failed:\n{printed}")
    estimate = re.search(r"estimated peak RAM ([\d.]+) GB", printed)
    manifest = json.loads((output / "manifest.json").read_text())
    llm = manifest["components"]["llm"]
    final = llm["quantization"]["attempts"][-1] if llm["quantization"] else None
    pipeline = manifest["pipeline_gate"]
    return {
        "precision": precision, "settled": llm["precision"], "scheme": final["scheme"] if final else "",
        "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9, "preflight_gb": float(estimate.group(1)) if estimate else None,
        "build_s": seconds, "llm_graph_gb": llm["bytes"] / 1e9, "cache_gb": _bytes_under(cache) / 1e9,
        "llm_agreement": final["agreement"]["agreement"] if final and final["agreement"] else None,
        "llm_cosine": final["agreement"]["logits"]["cosine"] if final and final["agreement"] else None,
        "pipeline_agreement": min(k["agreement"]["agreement"] for k in pipeline["figures"]["kinds"]) if pipeline else None,
        "repository": str(output),
    }


def decode_as_served(repository: Path, checkpoint: Path, steps: int) -> dict[str, float]:
    """:func:`decode` in a child process with the allocator setting every tritonserver of this project gets
    (``builder.serve.tritonserver.serving_environment``: huge pages for the weights); the builds keep this process's."""
    from builder.serve.tritonserver import serving_environment

    command = [sys.executable, __file__, str(checkpoint), "--decode", str(repository), "--steps", str(steps)]
    run = subprocess.run(command, env=serving_environment(os.environ), capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise SystemExit(f"decode of {repository} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


ROUNDS = 5  # decode runs, each beside its own read-bandwidth measurement


def decode(repository: Path, checkpoint: Path, steps: int) -> dict[str, float]:
    """Batch-1 decode of the repository's LLM graph by the server's runner against the bound this machine's read
    bandwidth (all threads) puts on it for the weight bytes a step reads (``builder.sizing``'s count for the
    precision). Both are measured side by side, ``ROUNDS`` times (the bandwidth, then ``steps`` decode steps): this
    machine's bandwidth moves between minutes by a third, so a ratio is only taken within a round; the figures are
    the rounds' medians."""
    from builder.bench import bounds
    from builder.bench.baselines import load_preprocessor
    from builder.runtime.generation import LanguageModelRunner, SamplingParams
    from builder.sizing import read_size
    from builder.spec import LimitsSpec

    manifest = json.loads((repository / "manifest.json").read_text())
    precision = manifest["components"]["llm"]["precision"]
    preprocess = load_preprocessor(repository, LimitsSpec(**manifest["spec"]["limits"]))
    facts = preprocess.facts
    inputs = preprocess(PROMPT, [], [])
    runner = LanguageModelRunner(str(repository / "llm" / "1" / "model.onnx"), facts)
    embeds = np.zeros((inputs.input_ids.size, facts.hidden_size), np.float32)
    read_bytes = read_size(checkpoint).decode_read_bytes(precision)
    threads = len(os.sched_getaffinity(0))
    rounds = []  # (tokens/s, read-bound tokens/s, GB/s)
    for _ in range(ROUNDS):
        gbps = bounds.read_bandwidth(threads)
        sequence = runner.start(inputs.input_ids, embeds, np.zeros(inputs.input_ids.size, bool),
                                SamplingParams(max_tokens=steps + 1))
        times = []
        for _ in range(steps):
            sequence.tokens.append(int(np.argmax(sequence.logits)))
            started = time.perf_counter()
            runner.decode([sequence])
            times.append(time.perf_counter() - started)
        runner.retire(sequence)
        rounds.append((1 / statistics.median(times[2:]), gbps * 1e9 / read_bytes, gbps))
    # The read bound alone: the compute side of DecodeBound is FP32 MatMul's rate, which int8-compute MatMulNBits beats.
    return {"decode_tokens_per_s": statistics.median(r[0] for r in rounds),
            "read_bound_tokens_per_s": statistics.median(r[1] for r in rounds),
            "of_bound": statistics.median(r[0] / r[1] for r in rounds), "read_gbps": statistics.median(r[2] for r in rounds),
            "rounds": " ".join(f"{r[0]:.2f} tok/s at {r[2]:.0f} GB/s" for r in rounds)}


def serve(repository: Path, max_tokens: int) -> dict[str, object]:
    """One text request through tritonserver (gRPC, the unary ensemble) and the same through the repository's models
    in this process: the new tokens of each."""
    import tritonclient.grpc as grpcclient

    from builder.bench.baselines import InProcessPipeline, load_preprocessor
    from builder.serve.client import Request, ask
    from builder.serve.tritonserver import TritonServer
    from builder.spec import LimitsSpec

    request = Request(PROMPT, max_tokens=max_tokens)
    started = time.perf_counter()
    with TritonServer(repository) as server:
        loaded = time.perf_counter() - started
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            served = ask(client, request).token_ids
    limits = LimitsSpec(**json.loads((repository / "manifest.json").read_text())["spec"]["limits"])
    pipeline = InProcessPipeline(repository, load_preprocessor(repository, limits), max_tokens)
    in_process = list(pipeline(request))
    return {"served_tokens": len(served), "same_tokens": served == in_process, "server_load_s": loaded}


def _bytes_under(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def main() -> None:
    from builder.source.headers import tensor_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a Hugging Face checkpoint directory (write_large_checkpoint.py)")
    parser.add_argument("--precisions", nargs="+", default=["int4", "int8"], choices=["int4", "int8", "fp16", "fp32"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/build_large"), help="repositories and caches go here")
    parser.add_argument("--open-gates", action="store_true", help="gates that pass the first rung (random weights; see above)")
    parser.add_argument("--serve", action="store_true", help="serve each repository and compare its answer")
    parser.add_argument("--steps", type=int, default=16, help="timed batch-1 decode steps")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where build_large.csv goes")
    parser.add_argument("--decode", type=Path, metavar="REPOSITORY", help="only measure this built repository's decode "
                        "(how the benchmark runs it, in a child process with the server's allocator); prints JSON")
    args = parser.parse_args()
    if args.decode:
        print(json.dumps(decode(args.decode, args.checkpoint, args.steps)))
        return
    checkpoint_bytes = sum(tensor_bytes(p)[1] for p in args.checkpoint.glob("*.safetensors"))
    rows = []
    for precision in args.precisions:
        row = build(args.checkpoint, precision, args.work, args.open_gates)
        row["x_checkpoint"] = row["peak_rss_gb"] * 1e9 / checkpoint_bytes
        row.update(decode_as_served(Path(str(row["repository"])), args.checkpoint, args.steps))
        if args.serve:
            row.update(serve(Path(str(row["repository"])), 8))
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    with open(args.output / "build_large.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\ncheckpoint {args.checkpoint} ({checkpoint_bytes / 1e9:.2f} GB as stored)")
    print("| precision | settled | peak RSS | x checkpoint | pre-flight | build | LLM graph | LLM gate agreement / cos "
          "| pipeline | decode tok/s (of read bound) | served = in-process |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['settled']} {r['scheme']} | {r['peak_rss_gb']:.2f} GB | {r['x_checkpoint']:.3f} | "
              f"{r['preflight_gb']} GB | {r['build_s']:.0f} s | {r['llm_graph_gb']:.2f} GB | "
              f"{r['llm_agreement']} / {r['llm_cosine']} | {r['pipeline_agreement']} | "
              f"{r['decode_tokens_per_s']:.2f} ({r['of_bound']:.0%}) | {r.get('same_tokens', '-')} |")


if __name__ == "__main__":
    main()
