"""`make bench`'s quick path on a very short sweep: every output exists and parses, every request succeeded.

Not timed: on a loaded machine a point that does not settle is kept and marked unstable, never failed.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import pytest
from PIL import Image

from builder.bench.results import perf_analyzer_row, stream_times
from builder.bench.run import QUICK, run_bench

pytestmark = pytest.mark.serving

SWEEP = (1, 2)
SERIES = ("ensemble (mixed)", "ensemble (text)", "ensemble_stream (mixed)")
BASELINES = ("in-process (mixed)", "in-process (text)", "HF eager (mixed)", "HF eager (text)")
ENCODERS = ("vision_encoder", "audio_encoder")


@pytest.fixture(scope="module")
def results(built_repository: Path, tiny_spec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import CACHE

    output = tmp_path_factory.mktemp("bench") / "smoke"
    settings = dataclasses.replace(QUICK, concurrency=SWEEP)
    run_bench(tiny_spec, built_repository, CACHE, output, settings, command="pytest tests/test_bench.py")
    return output


def _records(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_raw_perf_analyzer_csvs_parse(results: Path) -> None:
    for c in SWEEP:
        for name in ("ensemble_mixed", "ensemble_text", "ensemble_stream"):
            row = perf_analyzer_row(name, results / f"{name}_c{c}.csv", 32, stable=True)
            assert row.concurrency == c and row.requests_per_s > 0 and 0 < row.p50_ms <= row.p99_ms
        times = stream_times(results / f"ensemble_stream_c{c}.profile.json", 32)
        assert times.ttft_ms and all(t > 0 for t in times.ttft_ms)
        assert times.itl_ms and all(t > 0 for t in times.itl_ms)
    for name in ENCODERS:
        assert perf_analyzer_row(name, results / f"{name}_c1.csv", None, stable=True).requests_per_s > 0


def test_points_cover_every_series_with_finite_numbers(results: Path) -> None:
    points = _records(results / "points.csv")
    found = {(p["series"], int(p["concurrency"])) for p in points}
    expected = {(s, c) for s in SERIES for c in SWEEP} | {(b, 1) for b in BASELINES} | {(e, 1) for e in ENCODERS}
    assert found == expected
    for p in points:
        for key in ("requests_per_s", "p50_ms", "p95_ms", "p99_ms"):
            assert math.isfinite(float(p[key])) and float(p[key]) > 0, (p["series"], key)
        if p["series"] not in ENCODERS:
            assert float(p["tokens_per_s"]) > 0
    streamed = [p for p in points if p["series"] == "ensemble_stream (mixed)"]
    assert all(float(p["ttft_ms"]) > 0 and float(p["itl_ms"]) > 0 for p in streamed)


def test_every_request_succeeded(results: Path) -> None:
    counts = {r["model"]: (int(r["success"]), int(r["failure"])) for r in _records(results / "requests.csv")}
    assert all(failure == 0 for _, failure in counts.values()), counts
    assert all(counts[model][0] > 0 for model in ("ensemble", "ensemble_stream", *ENCODERS)), counts


def test_summary_states_the_ratios_and_the_same_tokens(results: Path) -> None:
    text = (results / "summary.md").read_text()
    assert "served vs in-process p50 latency at concurrency 1: **" in text
    assert "served vs HF eager tokens/s at concurrency 1: **" in text
    assert "at concurrency 8: not measured" in text  # this sweep stops at 2
    assert "served answers equal the in-process answers" in text
    assert ", 0 failed" in text
    assert "## Decode bound (memory bandwidth)" in text and "of the bound" in text


def test_plots_are_pngs(results: Path) -> None:
    for name in ("throughput_vs_concurrency.png", "latency_vs_concurrency.png"):
        with Image.open(results / name) as image:
            assert image.format == "PNG" and image.size[0] > 300


def test_no_verdict_for_a_baseline_slower_than_what_it_bounds_or_a_point_that_did_not_settle() -> None:
    from builder.bench.report import HF_EAGER, IN_PROCESS, MAIN_MIX, SERVED, Ratios, series
    from builder.bench.results import Row

    def row(name: str, p50: float, tokens: float, concurrency: int = 1, stable: bool = True) -> Row:
        return Row(series(name, MAIN_MIX), concurrency, 10.0, tokens, p50, p50, p50, stable=stable)

    faulty = Ratios.of([row(SERVED, 20, 1000), row(IN_PROCESS, 50, 400), row(HF_EAGER, 100, 100),
                        row(SERVED, 40, 4000, concurrency=8, stable=False)]).headline()
    assert "latency at concurrency 1: **0.40x** (target <= 1.15x, no verdict: the in-process baseline was slower" in faulty
    assert "at concurrency 8: **40.00x** (target >= 5x, no verdict: ensemble (mixed) at c=8 did not settle)" in faulty
    assert "tokens/s at concurrency 1: **10.00x** (target >= 2x, met)" in faulty  # both settled: a verdict
    honest = Ratios.of([row(SERVED, 20, 1000), row(IN_PROCESS, 18, 1100), row(HF_EAGER, 100, 100)]).headline()
    assert "**1.11x** (target <= 1.15x, met)" in honest and "**10.00x** (target >= 2x, met)" in honest
    close = Ratios.of([row(SERVED, 20.3, 1000), row(IN_PROCESS, 17.64, 1100)]).headline()
    assert "**1.151x** (target <= 1.15x, just missed)" in close  # not "1.15x, missed by 1.00x"


def test_the_decode_bound_is_bandwidth_over_the_bytes_a_step_reads() -> None:
    from builder.bench.bandwidth import DecodeBound, measure

    assert DecodeBound(10.0, 20.0, 2, 2 * 10**9).tokens_per_s == 10.0
    bound = measure(10**9)
    assert bound.threads >= 1 and 0.5 < bound.one_thread_gbps <= bound.all_threads_gbps * 1.5
