"""The whole benchmark of a built repository: baselines, the repository served under perf_analyzer, the report."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder.bench import baselines, bounds, inputs, perf_analyzer, report, step_profile
from builder.bench.metrics import RequestCounts, decode_counters, request_counts
from builder.bench.perf_analyzer import Measurement, Point
from builder.bench.plots import plot
from builder.bench.results import Row, perf_analyzer_row, sequential_row, stream_times, with_stream_times, write_rows
from builder.components import LLM
from builder.errors import BuildError
from builder.runtime.contract import DECODE_MODEL
from builder.sizing import read_size
from builder.spec import BuildSpec

POINT_FILES = ("*_c[0-9]*.csv", "*_c[0-9]*.log", "*_c[0-9]*.profile.json")  # perf_analyzer's files, one set per point
WINDOW_S = 12.0  # one measurement window: about this long of one-at-a-time requests
SLOW_TRIALS = 6  # windows per point for a slow model before it is kept as unstable


@dataclass(frozen=True)
class Settings:
    concurrency: tuple[int, ...]
    encoder_concurrency: tuple[int, ...]
    max_tokens: int  # new tokens per request, the same for every request and every baseline
    measurement: Measurement
    baseline_passes: int  # times each request of a mix is timed per baseline

    def for_request_time(self, request_s: float) -> Settings:
        """A model that takes seconds per request is measured in minutes, not an hour: windows of about
        WINDOW_S of one-at-a-time requests (at least 8, at most this setting's), and past a second per
        request at most SLOW_TRIALS windows per point and no concurrency 2 (1, 4, 8, 16 stay)."""
        requests = min(self.measurement.requests, max(8, round(WINDOW_S / request_s)))
        slow = request_s >= 1.0
        measurement = dataclasses.replace(self.measurement, requests=requests,
                                          max_trials=min(self.measurement.max_trials, SLOW_TRIALS) if slow else self.measurement.max_trials)
        concurrency = tuple(c for c in self.concurrency if c != 2) if slow else self.concurrency
        return dataclasses.replace(self, concurrency=concurrency, measurement=measurement)

    def estimate_minutes(self, request_s: float, cores: int) -> float:
        """Rough: ~4 windows per point at the throughput of min(concurrency, cores) parallel requests."""
        windows = 4 * self.measurement.requests * request_s
        llm_points = sum(windows / min(c, cores) for c in self.concurrency) * 3  # 2 unary mixes + streaming
        baselines = 2 * 6 * (self.baseline_passes + 1) * request_s * 3  # HF eager is ~several x slower
        return (llm_points + baselines + 60) / 60


QUICK = Settings((1, 2, 8), (1,), 32, Measurement(requests=6, stability=50, max_trials=4), baseline_passes=1)
FULL = Settings((1, 2, 4, 8, 16), (1, 4), 32, Measurement(requests=40, stability=20, max_trials=10), baseline_passes=5)


def run_bench(spec: BuildSpec, repository: Path, cache: Path, output: Path, settings: Settings, command: str) -> Path:
    """Writes ``output`` (CSVs, summary.md, plots); returns summary.md. BuildError if any request failed.
    ``repository`` is built from ``spec`` by the caller (the CLI builds first, as ``make bench`` does)."""
    from builder.cache import StageCache
    from builder.serve.tritonserver import TritonServer
    from builder.source.resolve import resolve_source

    started = time.monotonic()
    pa = perf_analyzer.find_perf_analyzer()  # fail early, before minutes of baselines
    checkpoint = resolve_source(spec.source, StageCache(cache)).checkpoint
    output.mkdir(parents=True, exist_ok=True)
    for stale in (f for pattern in POINT_FILES for f in output.glob(pattern)):  # a point this run skips leaves no old file
        stale.unlink()
    preprocessor = baselines.load_preprocessor(repository, spec.limits)
    facts = preprocessor.facts
    mixes = inputs.mixes(settings.max_tokens, images=facts.image is not None, audio=facts.audio is not None)

    rows: list[Row] = []
    in_process = baselines.InProcessPipeline(repository, preprocessor, spec.limits.max_tokens)
    in_process_first = {mix: _time_in_process(in_process, cases, settings) for mix, cases in mixes.items()}
    answers = {c.name: t.tokens for mix, cases in mixes.items() for c, t in zip(cases, in_process_first[mix])}
    request_s = float(np.mean([_p50_s(timed) for timed in in_process_first.values()]))
    settings = settings.for_request_time(request_s)
    print(f"benchmark {output.name}: about {settings.estimate_minutes(request_s, _cores()):.0f} min "
          f"(concurrency {', '.join(map(str, settings.concurrency))}; in-process request {request_s * 1000:.0f} ms)", flush=True)

    llm_precision = json.loads((repository / "manifest.json").read_text())["components"][LLM.name]["precision"]
    size = read_size(checkpoint)
    decode_bound = bounds.measure(size.decode_read_bytes(llm_precision), size.decode_parameters, size.hidden_size,
                                  size.intermediate_size, batches=tuple(c for c in settings.concurrency if c <= spec.triton.max_batch_size))
    text_prompts = [preprocessor(c.request.prompt, [], [], c.request.system_prompt).input_ids for c in mixes["text"]]
    steps = [step_profile.profile_decode(repository / DECODE_MODEL / "1" / "model.onnx", facts, text_prompts, batch)
             for batch in sorted({1, min(8, spec.triton.max_batch_size)})]
    hf = baselines.HuggingFaceEager(checkpoint, preprocessor)
    for mix, cases in mixes.items():
        rows.append(_baseline_row(report.HF_EAGER, mix, baselines.time_requests(hf, cases, settings.baseline_passes, streams=False)))
    del hf

    data = _write_inputs(output / "inputs", mixes)
    encoder_tensors = inputs.encoder_tensors(preprocessor, mixes[report.MAIN_MIX])
    with TritonServer(repository, log_path=output / "tritonserver.log") as server:
        served = _served_answers(server.grpc_url, mixes)
        tokens = {mix: float(np.mean([len(served[c.name]) for c in cases])) for mix, cases in mixes.items()}
        points = [(report.series(report.SERVED, mix), Point("ensemble", c, data[mix], output / f"ensemble_{mix}_c{c}.csv"), tokens[mix])
                  for mix in mixes for c in settings.concurrency]
        points += [(report.series(report.STREAMED, report.MAIN_MIX),
                    Point("ensemble_stream", c, data["stream"], output / f"ensemble_stream_c{c}.csv", streaming=True),
                    tokens[report.MAIN_MIX]) for c in settings.concurrency]
        points += [(p.model, p, None) for p in _encoder_points(server.grpc_url, encoder_tensors, settings, output)]
        error = None
        profiles: list[report.StepProfile] = []
        for name, point, per_request in points:
            print(f"  perf_analyzer {point.model} concurrency {point.concurrency}", flush=True)
            profiled = point.model == "ensemble"  # where the decode model's time goes, per unary point
            before, start = decode_counters(server.host, server.metrics_port) if profiled else None, time.monotonic()
            try:
                # A window holds at least one request per concurrent stream.
                measurement = dataclasses.replace(settings.measurement, requests=max(settings.measurement.requests, point.concurrency))
                stable = perf_analyzer.measure(pa, server.grpc_url, point, measurement)
            except BuildError as exc:  # report what was measured, then fail
                error = str(exc)
                break
            if before is not None:
                wall_s = time.monotonic() - start
                profiles.append(report.StepProfile(name, point.concurrency, wall_s, decode_counters(server.host, server.metrics_port) - before))
            row = perf_analyzer_row(name, point.csv, per_request, stable)
            streamed = point.streaming and per_request is not None
            rows.append(with_stream_times(row, stream_times(point.profile, per_request)) if streamed else row)
        counts = request_counts(server.host, server.metrics_port)
    # The floor again, the server gone: a run slowed by the machine's other load would be a floor above what it
    # bounds (the report flags that), so the faster of the two runs is kept.
    rows[:0] = [_baseline_row(report.IN_PROCESS, mix, min(in_process_first[mix], _time_in_process(in_process, cases, settings), key=_p50_s))
                for mix, cases in mixes.items()]

    write_rows(output / "points.csv", rows)
    _write_counts(output / "requests.csv", counts)
    plot(rows, output)
    summary = output / "summary.md"
    summary.write_text(report.Report(
        output.name, command, rows, counts, tokens, same_tokens=served == answers, machine=report.machine(),
        build=report.build_settings(repository), minutes=(time.monotonic() - started) / 60, error=error,
        decode_bound=decode_bound, profiles=profiles, steps=steps, window_requests=settings.measurement.requests,
    ).markdown())
    if error:
        raise BuildError(f"{error}\n(partial report: {summary})")
    failed = [c for c in counts if c.failure]
    if failed:
        raise BuildError(f"{sum(c.failure for c in failed)} requests failed ({', '.join(c.model for c in failed)}); see {summary}")
    return summary


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _time_in_process(pipeline: baselines.InProcessPipeline, cases: tuple[inputs.Case, ...], settings: Settings) -> list[baselines.Timed]:
    return baselines.time_requests(pipeline, cases, settings.baseline_passes, streams=True)


def _p50_s(timed: list[baselines.Timed]) -> float:
    return float(np.median([t.latency_s for t in timed]))


def _baseline_row(kind: str, mix: str, timed: list[baselines.Timed]) -> Row:
    return sequential_row(report.series(kind, mix), [t.latency_s for t in timed], [len(t.tokens) for t in timed],
                          [t.ttft_s for t in timed if t.ttft_s is not None])


def _write_inputs(directory: Path, mixes: dict[str, tuple[inputs.Case, ...]]) -> dict[str, Path]:
    """perf_analyzer ``--input-data`` files for ``ensemble`` (one per mix) and ``ensemble_stream``, beside the media."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "image.png").write_bytes(inputs.gradient_png())
    (directory / "audio.wav").write_bytes(inputs.chord_wav())
    files = {mix: inputs.write_json(directory / f"ensemble_{mix}.json", inputs.ensemble_input_data(cases, stream=False))
             for mix, cases in mixes.items()}
    files["stream"] = inputs.write_json(directory / "ensemble_stream.json",
                                        inputs.ensemble_input_data(mixes[report.MAIN_MIX], stream=True))
    return files


def _encoder_points(url: str, tensors: dict[str, dict[str, np.ndarray]], settings: Settings, output: Path) -> list[Point]:
    """Each encoder the server has, with the tensors ``preprocess`` makes, shaped for the model's batching."""
    import tritonclient.grpc as grpcclient

    points = []
    with grpcclient.InferenceServerClient(url) as client:
        for model, feeds in tensors.items():
            if not client.is_model_ready(model):
                continue
            batched = client.get_model_config(model).config.max_batch_size > 0  # then the request axis is the batch
            data = inputs.write_json(output / "inputs" / f"{model}.json", inputs.encoder_input_data(feeds, batched))
            points += [Point(model, c, data, output / f"{model}_c{c}.csv") for c in settings.encoder_concurrency]
    return points


def _served_answers(url: str, mixes: dict[str, tuple[inputs.Case, ...]]) -> dict[str, tuple[int, ...]]:
    """One unary call per case (also the server's warm-up): the new tokens each request yields."""
    import tritonclient.grpc as grpcclient

    from builder.serve.client import ask

    with grpcclient.InferenceServerClient(url) as client:
        return {c.name: tuple(ask(client, c.request).token_ids) for cases in mixes.values() for c in cases}


def _write_counts(path: Path, counts: list[RequestCounts]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in dataclasses.fields(RequestCounts)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(c) for c in counts)
