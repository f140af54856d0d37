"""PNG plots: served throughput and latency against concurrency, the baselines on the same axes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from builder.bench.report import HF_EAGER, IN_PROCESS, MAIN_MIX, SERVED, STREAMED, series
from builder.bench.results import Row


def _sweep(rows: Sequence[Row], name: str) -> list[Row]:
    return sorted((r for r in rows if r.series == name), key=lambda r: r.concurrency)


def plot(rows: Sequence[Row], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines = [(r, style) for kind, style in ((IN_PROCESS, ":"), (HF_EAGER, "--"))
                 for r in rows if r.series == series(kind, MAIN_MIX)]
    served = _sweep(rows, series(SERVED, MAIN_MIX))
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in sorted({r.series for r in rows if r.series.startswith((SERVED, STREAMED)) and r.tokens_per_s is not None}):
        sweep = _sweep(rows, name)
        ax.plot([r.concurrency for r in sweep], [r.tokens_per_s for r in sweep], marker="o", label=f"served: {name}")
    for r, style in baselines:
        ax.axhline(r.tokens_per_s or 0, linestyle=style, color="gray" if style == ":" else "black",
                   label=f"{r.series}, one at a time")
    ax.set(xscale="log", xlabel="concurrent requests", ylabel="new tokens / s", title="Throughput vs concurrency")
    paths.append(_save(fig, ax, served, directory / "throughput_vs_concurrency.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for q, marker in (("p50", "o"), ("p95", "s"), ("p99", "^")):
        ax.plot([r.concurrency for r in served], [getattr(r, f"{q}_ms") for r in served], marker=marker,
                label=f"served {series(SERVED, MAIN_MIX)} {q}")
    streamed = [r for r in _sweep(rows, series(STREAMED, MAIN_MIX)) if r.ttft_ms is not None]
    ax.plot([r.concurrency for r in streamed], [r.ttft_ms for r in streamed], marker="x", label="served TTFT p50 (streaming)")
    for r, style in baselines:
        ax.axhline(r.p50_ms, linestyle=style, color="gray" if style == ":" else "black", label=f"{r.series} p50")
    ax.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="latency (ms)",
           title="Request latency vs concurrency")
    paths.append(_save(fig, ax, served, directory / "latency_vs_concurrency.png"))
    plt.close("all")
    return paths


def _save(fig, ax, served: Sequence[Row], path: Path) -> Path:
    from matplotlib.ticker import ScalarFormatter

    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_xticks([r.concurrency for r in served], [str(r.concurrency) for r in served])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
