"""Soak: the served ensemble under sustained load, valid and invalid requests mixed.

    python benchmarks/soak.py                  # 10 minutes at concurrency 16 (the README's figures)
    python benchmarks/soak.py --seconds 20     # short mode

Starts its own tritonserver on 127.0.0.1 (free ports) on the built repository (`make engines` first)
and sends, from 16 threads, a fixed rotation of requests: for every invalid one (corrupt image, bad
WAV, max_tokens 0, NaN temperature, over-long prompt, unknown input, bad top_p on the stream) two
valid ones (text, text+image, text+audio, all three, streamed text). Each valid answer must equal the
greedy answer the server gave to the same request before the load started; each invalid request must
be refused with its error. Reports requests served, errors by kind, the RSS of the server's whole
process group (server + Python backend stubs) at start and end, and latency percentiles per window.

Writes windows.csv and summary.md into benchmarks/results/soak/ (or --out); exits 1 if a valid request
failed or the server died.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from builder.bench.inputs import gradient_png, mixes
from builder.serve.client import Request, ask, ask_stream
from builder.serve.tritonserver import TritonServer

RESULTS = Path(__file__).resolve().parent / "results" / "soak"


@dataclass(frozen=True)
class Kind:
    name: str
    request: Request
    stream: bool = False
    error: str | None = None  # invalid requests: a regex their error message must match


def kinds(max_tokens: int) -> tuple[list[Kind], list[Kind]]:
    """(valid, invalid) request kinds."""
    mixed = mixes(max_tokens)["mixed"]
    valid = [Kind(c.name, c.request) for c in mixed] + [Kind("text (stream)", mixed[0].request, stream=True)]
    invalid = [
        Kind("corrupt image", Request("Describe.", images=(gradient_png()[:150],)), error=r"image\[0\]: corrupt or truncated"),
        Kind("non-WAV audio", Request("Listen.", audio=(gradient_png(),)), error=r"audio\[0\]: not a valid WAV file"),
        Kind("empty WAV", Request("Listen.", audio=(b"",)), error=r"audio\[0\]: empty \(0 bytes\)"),
        Kind("max_tokens 0", Request("Hi.", max_tokens=0), error=r"max_tokens: 0 is outside 1\.\."),
        Kind("NaN temperature", Request("Hi.", temperature=float("nan")), error=r"temperature: nan must be"),
        Kind("over-long prompt", Request("x" * 500), error=r"text_input: the prompt is \d+ tokens"),
        Kind("unknown input", Request("Hi.", extra={"prompt": np.array([b"x"], np.object_)}), error=r"unexpected inference input 'prompt'"),
        Kind("top_p 1.5 (stream)", Request("Hi.", top_p=1.5, max_tokens=max_tokens), stream=True, error=r"top_p: 1.5 must be in"),
    ]
    return valid, invalid


def rotation(valid: list[Kind], invalid: list[Kind]) -> list[Kind]:
    """Two valid requests, then one invalid, until every invalid kind has come once."""
    cycle = itertools.cycle(valid)
    return [k for bad in invalid for k in (next(cycle), next(cycle), bad)]


@dataclass(frozen=True)
class Outcome:
    started: float  # seconds since the soak started
    seconds: float
    kind: str
    valid: bool
    error: str | None  # None: served right (valid) or refused with the expected error (invalid)


def send(client: grpcclient.InferenceServerClient, kind: Kind, timeout: float) -> list[int]:
    if kind.stream:
        return [t for _, ids in ask_stream(client, kind.request, timeout=timeout) for t in ids]
    return ask(client, kind.request, timeout=timeout).token_ids


def judge(kind: Kind, expected: dict[str, list[int]], client: grpcclient.InferenceServerClient, timeout: float) -> str | None:
    try:
        tokens = send(client, kind, timeout)
    except InferenceServerException as exc:
        message = exc.message() or str(exc)
        if kind.error is not None and re.search(kind.error, message):
            return None
        return f"error: {message.splitlines()[0][:120]}"
    if kind.error is not None:
        return "accepted an invalid request"
    return None if tokens == expected[kind.name] else "wrong answer"


@dataclass(frozen=True)
class GroupMemory:
    processes: int  # the server and its Python backend stubs: one fewer means a stub died
    rss: int  # bytes, summed


def group_memory(group: int) -> GroupMemory:
    """Processes and summed RSS of process group ``group`` (the server and its Python stubs), from /proc."""
    processes = rss = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != group:  # fields after "(comm)": state, ppid, pgrp, ...
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        if match and fields[0] != "Z":  # a zombie holds no memory and serves nothing
            processes += 1
            rss += int(match.group(1)) * 1024
    return GroupMemory(processes, rss)


@dataclass
class Window:
    index: int
    start: float
    end: float
    memory: GroupMemory  # sampled at the end of the window
    outcomes: list[Outcome] = field(default_factory=list)

    def row(self) -> dict[str, object]:
        valid = sorted(o.seconds for o in self.outcomes if o.valid)
        pct = {p: float(np.percentile(valid, p)) * 1000 if valid else float("nan") for p in (50, 90, 99)}
        return {
            "window": self.index, "start_s": round(self.start, 1), "end_s": round(self.end, 1),
            "requests": len(self.outcomes), "valid": len(valid), "invalid": len(self.outcomes) - len(valid),
            "errors": sum(o.error is not None for o in self.outcomes),
            "requests_per_s": round(len(self.outcomes) / max(self.end - self.start, 1e-9), 2),
            "valid_p50_ms": round(pct[50], 1), "valid_p90_ms": round(pct[90], 1), "valid_p99_ms": round(pct[99], 1),
            "server_rss_mb": round(self.memory.rss / 2**20, 1), "server_processes": self.memory.processes,
        }


@dataclass(frozen=True)
class SoakReport:
    seconds: float
    concurrency: int
    start: GroupMemory
    end: GroupMemory
    server_alive: bool
    windows: list[Window]

    @property
    def outcomes(self) -> list[Outcome]:
        return [o for w in self.windows for o in w.outcomes]

    def errors(self, valid: bool) -> Counter[tuple[str, str]]:
        return Counter((o.kind, o.error) for o in self.outcomes if o.valid == valid and o.error is not None)

    @property
    def ok(self) -> bool:
        return self.server_alive and self.end.processes == self.start.processes and not self.errors(valid=True)


def soak(server: TritonServer, seconds: float, concurrency: int = 16, window: float = 30,
         max_tokens: int = 16, timeout: float = 120) -> SoakReport:
    """Runs the load against a running server; requests start until ``seconds`` have passed."""
    url = server.grpc_url
    group = server._process.pid if server._process else 0  # the server leads its own process group
    valid, invalid = kinds(max_tokens)
    schedule = rotation(valid, invalid)
    with grpcclient.InferenceServerClient(url) as client:  # the reference answers, one at a time, before the load
        expected = {k.name: send(client, k, timeout) for k in valid}
    counter = itertools.count()
    results: list[Outcome] = []
    lock = threading.Lock()
    started = time.monotonic()

    def worker() -> None:
        with grpcclient.InferenceServerClient(url) as client:
            while (begin := time.monotonic()) < started + seconds:
                kind = schedule[next(counter) % len(schedule)]
                error = judge(kind, expected, client, timeout)
                outcome = Outcome(begin - started, time.monotonic() - begin, kind.name, kind.error is None, error)
                with lock:
                    results.append(outcome)

    start = group_memory(group)
    samples: list[tuple[float, GroupMemory]] = []  # (end of a window in seconds since the start, memory then)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(worker) for _ in range(concurrency)]
        edge = window
        while edge < seconds:
            time.sleep(max(0.0, started + edge - time.monotonic()))
            samples.append((edge, group_memory(group)))
            edge += window
        for future in futures:
            future.result()  # each worker ends after the request it had in flight at the deadline
    end = group_memory(group)
    samples.append((time.monotonic() - started, end))
    windows, begin = [], 0.0
    for i, (until, memory) in enumerate(samples):
        windows.append(Window(i, begin, until, memory, [o for o in results if begin <= o.started < until]))
        begin = until
    return SoakReport(seconds, concurrency, start, end, server.running, windows)


def write_report(report: SoakReport, out: Path, command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rows = [w.row() for w in report.windows]
    with open(out / "windows.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    outcomes = report.outcomes
    valid = [o for o in outcomes if o.valid]
    mb = 2**20
    lines = [
        f"# Soak: {report.seconds:g} s at concurrency {report.concurrency}",
        "",
        f"`{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; server and client on 127.0.0.1.",
        "",
        "| | |", "|---|---|",
        f"| requests served | {len(outcomes)} ({len(outcomes) / report.seconds:.2f}/s) |",
        f"| valid: answered right | {sum(o.error is None for o in valid)} of {len(valid)} |",
        f"| invalid: refused with their error | {sum(o.error is None for o in outcomes if not o.valid)} of {len(outcomes) - len(valid)} |",
        f"| errors on valid requests | {sum(report.errors(valid=True).values())} |",
        f"| server RSS (server + Python stubs) | {report.start.rss / mb:.0f} MB at start, {report.end.rss / mb:.0f} MB at end "
        f"({(report.end.rss - report.start.rss) / mb:+.0f} MB) |",
        f"| server processes (server + Python stubs) | {report.start.processes} at start, {report.end.processes} at end |",
        f"| server alive at the end | {'yes' if report.server_alive else 'NO'} |",
        "",
        "## Errors by kind",
        "",
    ]
    errors = report.errors(valid=True) + report.errors(valid=False)
    lines += ["| request kind | error | count |", "|---|---|---|"] + [
        f"| {kind} | {error} | {count} |" for (kind, error), count in errors.most_common()
    ] if errors else ["None: every valid request got its greedy answer, every invalid one its error."]
    lines += ["", "## Per window (latency of valid requests, RSS at the window's end)", "",
              "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600, help="duration of the load (default 600)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--window", type=float, default=30, help="seconds per latency/RSS window (default 30)")
    parser.add_argument("--max-tokens", type=int, default=16, help="new tokens per valid request")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    if not (args.repository / "manifest.json").is_file():
        print(f"error: {args.repository} holds no built repository: run `make engines` first", file=sys.stderr)
        return 2
    with TritonServer(args.repository, log_path=args.out / "tritonserver.log") as server:
        report = soak(server, args.seconds, args.concurrency, args.window, args.max_tokens)
    summary = write_report(report, args.out, "python benchmarks/soak.py " + " ".join(sys.argv[1:]))
    print(summary.read_text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
