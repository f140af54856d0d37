"""The soak benchmark's short mode against the session's real tritonserver."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from benchmarks.soak import soak, write_report

pytestmark = pytest.mark.serving


def test_short_soak_has_no_errors_on_valid_requests(server, tmp_path: Path):
    report = soak(server, seconds=20, concurrency=16, window=5, max_tokens=8)
    assert report.ok, report.errors(valid=True)
    outcomes = report.outcomes
    assert sum(o.valid for o in outcomes) >= 16 and sum(not o.valid for o in outcomes) >= 8
    assert not report.errors(valid=False), "every invalid request is refused with its own error"
    assert report.start.rss > 100 * 2**20 and report.end.processes == report.start.processes >= 7  # server + 6 stubs

    summary = write_report(report, tmp_path, "python benchmarks/soak.py --seconds 20 --window 5")
    rows = list(csv.DictReader(open(tmp_path / "windows.csv")))
    assert len(rows) >= 4 and sum(int(r["requests"]) for r in rows) == len(outcomes)
    assert "| errors on valid requests | 0 |" in summary.read_text()
