"""``summary.md``: the ratios against the targets on top, then every measured row, the machine and the build."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from builder.bench.bounds import DecodeBound
from builder.bench.metrics import DecodeCounters, RequestCounts
from builder.bench.results import Row
from builder.bench.step_profile import StepBreakdown
from builder.serve.tritonserver import TRITON_VERSION

SERVED, STREAMED, IN_PROCESS, HF_EAGER = "ensemble", "ensemble_stream", "in-process", "HF eager"
MAIN_MIX = "mixed"
TEXT_MIX = "text"
# The targets the headline judges (each stated here only). Served latency over the in-process floor at c=1;
# served tokens/s over HF eager one at a time (mixed requests at c=1 and c=8, text requests at c=8 at a
# realistic size); unary over streaming tokens/s; served text tokens/s at c=1 as a share of the decode bound.
LATENCY_OVERHEAD_C1 = 1.15
OVER_HF_C1, OVER_HF_C8, TEXT_OVER_HF_C8 = 2.0, 5.0, 10.0
STREAMING_COST = 1.3
SHARE_OF_BOUND_C1 = 0.8
_PACKAGES = ("tritonclient", "nvidia-pytriton", "onnxruntime", "torch", "transformers", "numpy")


def series(kind: str, mix: str) -> str:
    return f"{kind} ({mix})"


@dataclass(frozen=True)
class Ratio:
    value: float | None
    unsettled: str | None = None  # the points that did not settle: never "met", a miss still a miss
    fault: str | None = None  # a baseline beaten by what it bounds: no verdict at all


@dataclass(frozen=True)
class Ratios:
    latency_c1: Ratio  # served p50 / in-process p50
    tokens_c1: Ratio  # served tokens/s / HF eager tokens/s
    tokens_c8: Ratio
    streaming: dict[int, Ratio] = field(default_factory=dict)  # concurrency -> unary tokens/s / streaming tokens/s
    text_tokens_c8: Ratio = Ratio(None)  # text requests: served tokens/s at c=8 / HF eager tokens/s
    share_of_bound_c1: Ratio = Ratio(None)  # text requests: served tokens/s at c=1 / the batch-1 decode bound

    @classmethod
    def of(cls, rows: Sequence[Row], bound_tokens_per_s: float | None = None) -> Ratios:
        def find(name: str, concurrency: int = 1, mix: str = MAIN_MIX) -> Row | None:
            return next((r for r in rows if r.series == series(name, mix) and r.concurrency == concurrency), None)

        def unsettled(*points: Row) -> str | None:
            names = [f"{p.series} at c={p.concurrency}" for p in points if not p.stable]
            return f"{', '.join(names)} did not settle" if names else None

        def tokens(served: Row | None, hf: Row | None) -> Ratio:
            if not (served and hf and served.tokens_per_s and hf.tokens_per_s):
                return Ratio(None)
            return Ratio(served.tokens_per_s / hf.tokens_per_s, unsettled(served, hf))

        served1, served8, floor, hf = find(SERVED), find(SERVED, 8), find(IN_PROCESS), find(HF_EAGER)
        streaming = {}
        for streamed in sorted((r for r in rows if r.series == series(STREAMED, MAIN_MIX)), key=lambda r: r.concurrency):
            unary = find(SERVED, streamed.concurrency)
            if unary and unary.tokens_per_s and streamed.tokens_per_s:
                streaming[streamed.concurrency] = Ratio(unary.tokens_per_s / streamed.tokens_per_s, unsettled(unary, streamed))
        latency = Ratio(None)
        if served1 and floor:
            # In-process is the floor of served latency: a floor slower than the server is a measuring fault.
            fault = ("the in-process baseline was slower than the server it bounds: a measuring fault (a loaded machine?)"
                     if floor.p50_ms > served1.p50_ms else None)
            latency = Ratio(served1.p50_ms / floor.p50_ms, unsettled(served1, floor), fault)
        text1, text8 = find(SERVED, mix=TEXT_MIX), find(SERVED, 8, TEXT_MIX)
        share = Ratio(None)
        if text1 and text1.tokens_per_s and bound_tokens_per_s:
            share = Ratio(text1.tokens_per_s / bound_tokens_per_s, unsettled(text1))
        return cls(latency, tokens(served1, hf), tokens(served8, hf), streaming,
                   tokens(text8, find(HF_EAGER, mix=TEXT_MIX)), share)

    def headline(self) -> str:
        return "; ".join([
            _ratio("served vs in-process p50 latency at concurrency 1", self.latency_c1, LATENCY_OVERHEAD_C1, at_most=True),
            _ratio("served vs HF eager tokens/s at concurrency 1", self.tokens_c1, OVER_HF_C1),
            _ratio("at concurrency 8", self.tokens_c8, OVER_HF_C8),
            *(_ratio(f"unary vs streaming tokens/s at concurrency {c}", r, STREAMING_COST, at_most=True)
              for c, r in self.streaming.items()),
            *([_ratio("text requests: served vs HF eager tokens/s at concurrency 8", self.text_tokens_c8, TEXT_OVER_HF_C8)]
              if self.text_tokens_c8.value is not None else []),
            *([_ratio("served text tokens/s at concurrency 1 vs the batch-1 decode bound", self.share_of_bound_c1,
                      SHARE_OF_BOUND_C1)] if self.share_of_bound_c1.value is not None else []),
        ])


def _ratio(what: str, ratio: Ratio, target: float, at_most: bool = False) -> str:
    if ratio.value is None:
        return f"{what}: not measured"
    value = ratio.value
    met = value <= target if at_most else value >= target
    off = value / target if at_most else target / value
    missed = f"{'missed' if at_most else 'short'} by {off:.2f}x" if off >= 1.005 else "just missed"
    if ratio.unsettled:
        verdict = f"no verdict: {ratio.unsettled}" if met else f"{missed}; {ratio.unsettled}"
    elif ratio.fault:
        verdict = f"no verdict: {ratio.fault}"
    else:
        verdict = "met" if met else missed
    digits = 3 if f"{value:.2f}" == f"{target:.2f}" else 2  # 1.152 is not "1.15x, missed"
    return f"{what}: **{value:.{digits}f}x** (target {'<=' if at_most else '>='} {target:g}x, {verdict})"


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    memory = next((line.split()[1] for line in _read("/proc/meminfo").splitlines() if line.startswith("MemTotal")), "0")
    versions = ", ".join(f"{p} {_version(p)}" for p in _PACKAGES)
    return {
        "CPU": f"{cpu}, {os.cpu_count()} logical cores, {int(memory) / 2**20:.1f} GiB, no GPU" ,
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "OS / Python": f"{platform.platform()}, Python {platform.python_version()}",
        "versions": f"tritonserver {TRITON_VERSION} (from nvidia-pytriton), {versions}",
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "missing"


def build_settings(repository: Path) -> dict[str, str]:
    manifest = json.loads((repository / "manifest.json").read_text())
    spec = manifest["spec"]
    components = ", ".join(f"{name} {c['precision']}" for name, c in manifest["components"].items())
    return {
        "spec": f"{spec['name']} (target {spec['target']}), built {manifest['built_at']}",
        "components": components,
        "triton": ", ".join(f"{k}={v}" for k, v in spec["triton"].items()),
        "limits": ", ".join(f"{k}={v}" for k, v in spec["limits"].items()),
    }


def _cell(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table(rows: Sequence[Row]) -> str:
    lines = ["| series | concurrency | requests/s | tokens/s | p50 ms | p95 ms | p99 ms | TTFT p50 ms | ITL ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = r.series if r.stable else f"{r.series} (unstable)"
        lines.append(f"| {name} | {r.concurrency} | {r.requests_per_s:.2f} | {_cell(r.tokens_per_s)} | {r.p50_ms:.1f} | "
                     f"{r.p95_ms:.1f} | {r.p99_ms:.1f} | {_cell(r.ttft_ms)} | {_cell(r.itl_ms, 2)} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class StepProfile:
    """The decode model's counters over one served point (``llm``'s own metrics): where its time went."""

    series: str
    concurrency: int
    wall_s: float
    counters: DecodeCounters


@dataclass(frozen=True)
class Report:
    name: str
    command: str
    rows: Sequence[Row]
    requests: Sequence[RequestCounts]
    tokens_per_request: dict[str, float]  # mix -> mean new tokens per request
    same_tokens: bool  # served answers == in-process answers for every case
    machine: dict[str, str]
    build: dict[str, str]
    minutes: float
    error: str | None = None  # why the sweep stopped early, if it did
    decode_bound: DecodeBound | None = None
    profiles: Sequence[StepProfile] = ()
    steps: Sequence[StepBreakdown] = ()  # one decode step taken apart in this process, per batch
    window_requests: int = 0  # perf_analyzer's count window (at least the concurrency)

    def markdown(self) -> str:
        served = [r for r in self.rows if r.series.startswith(f"{SERVED} (")]
        streamed = [r for r in self.rows if r.series.startswith(STREAMED)]
        baselines = [r for r in self.rows if r.series.startswith((IN_PROCESS, HF_EAGER))]
        encoders = [r for r in self.rows if r not in (*served, *streamed, *baselines)]
        total = sum(c.success for c in self.requests if c.model in (SERVED, STREAMED))
        failed = sum(c.failure for c in self.requests)
        tokens = ", ".join(f"{mix}: {n:.1f}" for mix, n in self.tokens_per_request.items())
        sections = [
            f"# Benchmark `{self.name}`",
            Ratios.of(self.rows, self.decode_bound.tokens_per_s if self.decode_bound else None).headline() + ".",
            *([f"**The sweep stopped early**: {self.error.splitlines()[0]}"] if self.error else []),
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {self.minutes:.1f} min with "
            f"`{self.command}`. perf_analyzer over gRPC, one concurrency point per run (count windows of "
            f"{self.window_requests} requests or the concurrency if larger; "
            "\"unstable\" marks a point that did not settle within the stability threshold and was kept as measured).",
            f"Requests: {total} to the ensembles, {failed} failed (server counters, every model). New tokens per request "
            f"(greedy, fixed max_tokens): {tokens}; served answers {'equal' if self.same_tokens else 'DIFFER FROM'} the "
            "in-process answers token for token.",
            "Mixes: `text` = two text-only prompts; `mixed` = text, text+image (PNG), text+audio (WAV, 1.5 s), "
            "text+image+audio, in turn (those the model takes). Served tokens/s = requests/s x mean new tokens per request.",
            "## Served: `ensemble` (unary)", table(served),
            "## Served, streaming: `ensemble_stream` (perf_analyzer `--streaming`; TTFT and inter-token latency "
            "from its `--profile-export-file` response timestamps)", table(streamed),
            *self._decode_bound(served, streamed),
            "## Baselines, one request at a time in this process (same requests, same new tokens)", table(baselines),
            "In-process: the repository's ONNX graphs + the server's preprocessing + `builder.runtime` decode loop, timed "
            "before the served points and again after them, the faster run kept. "
            "HF eager: the source checkpoint's `generate` in PyTorch on the same preprocessed tensors.",
            "## Encoders alone (the tensors `preprocess` makes for one image / one clip)", table(encoders),
            "## Server request counts", "| model | success | failure |\n|---|---:|---:|\n"
            + "\n".join(f"| {c.model} | {c.success} | {c.failure} |" for c in self.requests),
            "## Machine", _pairs(self.machine),
            "## Build", _pairs(self.build),
            "Plots: `throughput_vs_concurrency.png`, `latency_vs_concurrency.png`; raw perf_analyzer CSVs, logs and "
            "profile exports beside this file; every row above in `points.csv`.",
        ]
        return "\n\n".join(sections) + "\n"

    def _decode_bound(self, served: Sequence[Row], streamed: Sequence[Row]) -> list[str]:
        if self.decode_bound is None:
            return []
        at_one = {r.series: r for r in (*served, *streamed) if r.concurrency == 1}
        hf_text = next((r for r in self.rows if r.series == series(HF_EAGER, TEXT_MIX)), None)
        return [*_decode_bound_section(self.decode_bound, at_one.get(series(SERVED, "text")), at_one.get(series(STREAMED, MAIN_MIX))),
                *_profile_section(self.decode_bound, self.profiles), *_step_section(self.decode_bound, self.steps),
                *_text_c8_budget(self.decode_bound, self.steps, hf_text.tokens_per_s if hf_text else None)]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g}"  # 0.0117 for the tiny preset, 36.8 for the small one


def _bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _decode_bound_section(bound: DecodeBound, served: Row | None, streamed: Row | None) -> list[str]:
    batches = sorted(bound.gflops)
    lines = [
        f"Read bandwidth: {bound.one_thread_gbps:.1f} GB/s one thread, {bound.all_threads_gbps:.1f} GB/s with "
        f"{bound.threads} threads (numpy sums over 1 GiB, median of 5). A decode step reads every weight of the LLM "
        f"except the embedding table, {_bytes(bound.weight_bytes_per_token)}: at least {_ms(bound.read_s)} ms",
        f"Compute: FP32 MatMul through the decoder's MLP matrices (ONNX Runtime, {bound.threads} threads, weights in "
        "cache) runs " + ", ".join(f"{bound.gflops[b]:.0f} GFLOP/s at batch {b}" for b in batches)
        + f"; a step multiplies each sequence by {bound.decode_parameters / 1e6:.1f}M weights (2 FLOPs each): at least "
        + ", ".join(f"{_ms(bound.compute_s(b))} ms at batch {b}" for b in batches),
        "So a step takes at least " + ", ".join(f"{_ms(bound.step_floor_s(b))} ms at batch {b} "
                                                f"(**{b / bound.step_floor_s(b):.1f} tokens/s**)" for b in batches),
    ]
    if served is not None and served.tokens_per_s:
        lines.append(f"Served at concurrency 1: {served.tokens_per_s:.1f} tokens/s end to end "
                     f"(text requests: **{served.tokens_per_s / bound.tokens_per_s:.0%} of the batch-1 bound**, prefill and the pipeline included)")
    if streamed is not None and streamed.itl_ms:
        decode = 1000 / streamed.itl_ms
        lines.append(f"decode alone {decode:.1f} tokens/s (1 / streaming inter-token latency at concurrency 1: "
                     f"{decode / bound.tokens_per_s:.0%} of the bound)")
    paragraphs = [". ".join(lines[:3]) + ".", *(["; ".join(lines[3:]) + "."] if lines[3:] else [])]
    return ["## Decode bound (memory bandwidth and compute)", *paragraphs]


def _profile_section(bound: DecodeBound, profiles: Sequence[StepProfile]) -> list[str]:
    if not profiles:
        return []
    lines = ["| series | concurrency | mean decode batch | ms per decode step | floor at that batch | decode | prefill | waiting for work |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in profiles:
        c = p.counters
        if not c.steps or p.wall_s <= 0:
            continue
        batch = c.step_sequences / c.steps
        lines.append(f"| {p.series} | {p.concurrency} | {batch:.1f} | {c.step_seconds / c.steps * 1000:.2f} | "
                     f"{_ms(bound.step_floor_s(batch))} | {c.step_seconds / p.wall_s:.0%} | {c.prefill_seconds / p.wall_s:.0%} | "
                     f"{max(0.0, 1 - (c.step_seconds + c.prefill_seconds) / p.wall_s):.0%} |")
    return ["## Where the decode model's time goes (unary points, `llm`'s own counters over each run)", "\n".join(lines),
            "Shares of the point's wall time: decode steps, prefills (one request at a time, between steps), and the "
            "rest, when `llm` had nothing to run: requests still in preprocessing, the encoders, `fuse` or gRPC, and "
            "perf_analyzer's own start."]


def _step_section(bound: DecodeBound, steps: Sequence[StepBreakdown]) -> list[str]:
    if not steps:
        return []
    lines = ["| decode batch | context | ms per step | floor | where it goes (ONNX Runtime profiler: op types' kernels, the run around them, Python) |",
             "|---:|---:|---:|---:|---|"]
    for step in steps:
        ops = list(step.op_shares.items())
        top = [*ops[:4], ("other kernels", sum(share for _, share in ops[4:])),
               ("session run around the kernels", step.session_share), ("Python around the run", step.python_share)]
        lines.append(f"| {step.batch} | {step.context} | {step.decode_ms:.2f} | {_ms(bound.step_floor_s(step.batch))} | "
                     + ", ".join(f"{name} {share:.0%}" for name, share in top) + " |")
    return ["## One decode step taken apart (the repository's LLM graph in this process, no server)", "\n".join(lines),
            "The graph `llm` serves, on the text requests' prompts. Against the served ms per step above: in the "
            "server, preprocessing, the encoders, gRPC and prefills share these cores with the decode steps, and "
            "media make longer caches."]


def _text_c8_budget(bound: DecodeBound, steps: Sequence[StepBreakdown], hf_tokens_per_s: float | None) -> list[str]:
    """What the text target at c=8 asks of one decode step, against the step taken apart: the shortfall explained
    by the matrix multiplications alone (their kernels), not guessed."""
    step = next((s for s in steps if s.batch == 8), None)
    if step is None or not hf_tokens_per_s:
        return []
    need = TEXT_OVER_HF_C8 * hf_tokens_per_s
    budget_ms = 1000 * step.batch / need
    matmul_share = sum(share for op, share in step.op_shares.items() if "MatMul" in op or op == "Gemm")
    matmul_ms = matmul_share * step.decode_ms
    verdict = ("the multiplications alone take more than the whole step may: out of reach with these weights on this machine"
               if matmul_ms >= budget_ms else
               f"{budget_ms - matmul_ms:.1f} ms are left for everything else in a step (it takes {step.decode_ms - matmul_ms:.1f} ms now)")
    return [f"**What {TEXT_OVER_HF_C8:g}x HF eager at concurrency 8 asks.** {TEXT_OVER_HF_C8:g} x {hf_tokens_per_s:.1f} = "
            f"{need:.0f} text tokens/s: a step of {step.batch} sequences every {budget_ms:.1f} ms, prefills included, against "
            f"a floor of {_ms(bound.step_floor_s(step.batch))} ms. The batch-{step.batch} step above takes {step.decode_ms:.1f} ms, "
            f"{matmul_ms:.1f} ms of it in matrix-multiply kernels ({matmul_share:.0%}): {verdict}."]


def _pairs(values: dict[str, str]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in values.items())
