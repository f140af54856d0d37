"""What huge pages for the weights buy (``ALLOCATOR_TUNABLE``, glibc.malloc.hugetlb=1), measured side by side.

For a built repository, with the tunable off (hugetlb=0) and on (hugetlb=1), alternated for --rounds rounds so
both see the same machine load:
- one decode step of `llm`'s graph at batch 1 and 8, each setting in a fresh process (the bench's step profile);
- the served `ensemble` on the bench's text requests at concurrency 1 and 8 (perf_analyzer), a fresh
  server per setting, with the huge pages and the memory (RSS) of the server and every stub.

    python benchmarks/huge_pages.py --repository /tmp/small_repo --spec specs/small.yaml   # ~8 min for small

Writes huge_pages.csv into benchmarks/results/huge_pages/ (or --output) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=1")
BATCHES = (1, 8)
CONCURRENCY = (1, 8)


@dataclass(frozen=True)
class Round:
    tunable: str
    round: int
    step_ms: dict[int, float]  # decode batch -> ms per step, in a fresh process
    tokens_per_s: dict[int, float]  # concurrency -> served text tokens/s
    server_rss_mb: float  # tritonserver and every stub, once the points ran
    huge_pages_mb: float  # of that, in transparent huge pages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--spec", type=Path, default=ROOT / "specs" / "tiny.yaml", help="the spec it was built from (its limits)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "huge_pages")
    parser.add_argument("--steps-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.steps_only:
        print(json.dumps(_steps(args.repository, args.spec)))
        return
    rounds = [_round(args, tunable, r) for r in range(args.rounds) for tunable in SETTINGS]
    args.output.mkdir(parents=True, exist_ok=True)
    with open(args.output / "huge_pages.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tunable", "round", *(f"step_ms_batch{b}" for b in BATCHES),
                         *(f"tokens_per_s_c{c}" for c in CONCURRENCY), "server_rss_mb", "huge_pages_mb"])
        for r in rounds:
            writer.writerow([r.tunable, r.round, *(f"{r.step_ms[b]:.2f}" for b in BATCHES),
                             *(f"{r.tokens_per_s[c]:.1f}" for c in CONCURRENCY), f"{r.server_rss_mb:.0f}", f"{r.huge_pages_mb:.0f}"])
    print(f"| GLIBC_TUNABLES | round | {' | '.join(f'ms per step, batch {b}' for b in BATCHES)} | "
          f"{' | '.join(f'served text tokens/s, c={c}' for c in CONCURRENCY)} | server RSS MB | of it huge pages MB |")
    print("|---|---:|" + "---:|" * (len(BATCHES) + len(CONCURRENCY) + 2))
    for r in rounds:
        print(f"| {r.tunable} | {r.round + 1} | {' | '.join(f'{r.step_ms[b]:.2f}' for b in BATCHES)} | "
              f"{' | '.join(f'{r.tokens_per_s[c]:.1f}' for c in CONCURRENCY)} | {r.server_rss_mb:.0f} | {r.huge_pages_mb:.0f} |")
    print(f"wrote {args.output / 'huge_pages.csv'}")


def _round(args: argparse.Namespace, tunable: str, round_: int) -> Round:
    env = {**os.environ, "GLIBC_TUNABLES": tunable}  # an explicit value wins over the server's default
    child = subprocess.run([sys.executable, __file__, "--steps-only", "--repository", str(args.repository), "--spec", str(args.spec)],
                           env=env, capture_output=True, text=True, check=True)
    steps = {int(b): ms for b, ms in json.loads(child.stdout.strip().splitlines()[-1]).items()}
    os.environ["GLIBC_TUNABLES"] = tunable  # the server starts from this process's environment
    tokens, rss, huge = _served(args.repository, args.output)
    result = Round(tunable, round_, steps, tokens, rss, huge)
    print(json.dumps(asdict(result)), flush=True)
    return result


def _steps(repository: Path, spec_path: Path) -> dict[int, float]:
    from builder.bench import baselines, inputs
    from builder.bench.step_profile import profile_decode
    from builder.spec import load_spec

    preprocessor = baselines.load_preprocessor(repository, load_spec(spec_path).limits)
    prompts = [preprocessor(c.request.prompt, [], [], c.request.system_prompt).input_ids for c in inputs.mixes(32)["text"]]
    graph = repository / "llm" / "1" / "model.onnx"
    return {b: profile_decode(graph, preprocessor.facts, prompts, b).decode_ms for b in BATCHES}


def _served(repository: Path, output: Path) -> tuple[dict[int, float], float, float]:
    from builder.bench import inputs, perf_analyzer
    from builder.bench.results import perf_analyzer_row
    from builder.serve.tritonserver import TritonServer

    data = inputs.write_json(output / "inputs" / "ensemble_text.json", inputs.ensemble_input_data(inputs.mixes(32)["text"], stream=False))
    pa = perf_analyzer.find_perf_analyzer()
    tokens = {}
    with TritonServer(repository, log_path=output / "tritonserver.log") as server:
        for c in CONCURRENCY:
            point = perf_analyzer.Point("ensemble", c, data, output / f"ensemble_text_c{c}.csv")
            stable = perf_analyzer.measure(pa, server.grpc_url, point, perf_analyzer.Measurement(requests=max(12, 2 * c), stability=20, max_trials=4))
            tokens[c] = perf_analyzer_row("ensemble (text)", point.csv, 32.0, stable).tokens_per_s or 0.0
        rss, huge = _memory_mb(server.processes())
    return tokens, rss, huge


def _memory_mb(pids: list[int]) -> tuple[float, float]:
    """RSS and AnonHugePages summed over ``pids``."""
    kb = {"Rss:": 0, "AnonHugePages:": 0}
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:  # the process ended meanwhile
            continue
        for line in lines:
            key, value, *_ = line.split()
            if key in kb:
                kb[key] += int(value)
    return kb["Rss:"] / 1024, kb["AnonHugePages:"] / 1024


if __name__ == "__main__":
    main()
