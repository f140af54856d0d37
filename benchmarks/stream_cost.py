"""What a streamed request costs the server beside a unary one: CPU time per request, measured side by side.

Serves a built repository, then runs perf_analyzer on `ensemble` and on `ensemble_stream` (the bench's
mixed requests, 32 new tokens) at one concurrency, alternating unary and streaming for --rounds rounds so
both see the same machine load. For each run: requests/s, the core-seconds the server spent per request
(tritonserver and every Python stub, from /proc), the same for perf_analyzer, and for streaming how many
times `ensemble_stream` called `llm` per request (Triton's own request counters).

    python benchmarks/stream_cost.py                       # model_repository/, concurrency 8, 3 rounds (~1 min)

Writes stream_cost.csv into benchmarks/results/stream_cost/ (or --output) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from builder.bench import inputs
from builder.bench.metrics import request_counts
from builder.bench.perf_analyzer import find_perf_analyzer
from builder.bench.report import MAIN_MIX, machine
from builder.serve.tritonserver import TritonServer

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Run:
    model: str
    requests_per_s: float
    server_ms_per_request: float  # core time
    client_ms_per_request: float  # perf_analyzer's core time
    polls_per_request: float  # llm requests per ensemble request (1 for unary)


def core_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    return total


def successes(server: TritonServer) -> dict[str, int]:
    return {c.model: c.success for c in request_counts(server.host, server.metrics_port)}


def measure(server: TritonServer, model: str, data: Path, concurrency: int, requests: int) -> Run:
    pa = find_perf_analyzer()
    pids = server.processes()
    command = [str(pa.binary), "-m", model, "-u", server.grpc_url, "-i", "grpc", "--input-data", str(data),
               f"--concurrency-range={concurrency}:{concurrency}", "--measurement-mode=count_windows",
               f"--measurement-request-count={requests}", "--stability-percentage=1000", "--max-trials=3"]
    if model == "ensemble_stream":
        command.append("--streaming")
    before, server_before, start = successes(server), core_seconds(pids), time.monotonic()
    result = subprocess.run(["/usr/bin/time", "-f", "%U %S", *command], capture_output=True, text=True, env=pa.env, check=True)
    wall = time.monotonic() - start
    server_cpu = core_seconds(pids) - server_before
    after = successes(server)
    served = after[model] - before.get(model, 0)
    client_cpu = sum(map(float, result.stderr.strip().splitlines()[-1].split()))
    polls = (after["llm"] - before.get("llm", 0)) / served
    return Run(model, served / wall, 1000 * server_cpu / served, 1000 * client_cpu / served, polls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="unary then streaming, this many times")
    parser.add_argument("--requests", type=int, default=200, help="perf_analyzer's count window")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "stream_cost")
    args = parser.parse_args()
    cases = inputs.mixes(32)[MAIN_MIX]
    data = {"ensemble": inputs.write_json(args.output / "inputs" / "ensemble.json", inputs.ensemble_input_data(cases, stream=False)),
            "ensemble_stream": inputs.write_json(args.output / "inputs" / "ensemble_stream.json",
                                                 inputs.ensemble_input_data(cases, stream=True))}
    runs = []
    with TritonServer(args.repository, log_path=args.output / "tritonserver.log") as server:
        for _ in range(args.rounds):
            for model in ("ensemble", "ensemble_stream"):
                runs.append(measure(server, model, data[model], args.concurrency, args.requests))
                print(f"  {runs[-1]}", flush=True)
    with (args.output / "stream_cost.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "requests_per_s", "server_core_ms_per_request", "client_core_ms_per_request", "llm_requests_per_request"])
        writer.writerows([r.model, f"{r.requests_per_s:.2f}", f"{r.server_ms_per_request:.2f}", f"{r.client_ms_per_request:.2f}",
                          f"{r.polls_per_request:.2f}"] for r in runs)
    print(f"\n{args.repository}, mixed requests of 32 new tokens, concurrency {args.concurrency}, {args.rounds} rounds "
          f"alternating; medians:")
    for key, value in machine().items():
        print(f"{key}: {value}")
    print("\n| entry point | requests/s | server core ms per request | perf_analyzer core ms per request | llm requests per request |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for model in ("ensemble", "ensemble_stream"):
        mine = [r for r in runs if r.model == model]
        print(f"| `{model}` | {statistics.median(r.requests_per_s for r in mine):.1f} | "
              f"{statistics.median(r.server_ms_per_request for r in mine):.1f} | "
              f"{statistics.median(r.client_ms_per_request for r in mine):.2f} | {statistics.median(r.polls_per_request for r in mine):.2f} |")


if __name__ == "__main__":
    main()
