"""``build_report.md``: per component, what was built and how well it matches FP32; then the whole pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from builder.compile.artifacts import CompiledModel
from builder.components import LLM
from builder.quantize.pipeline import PipelineResult
from builder.spec import BuildSpec


def write_report(path: Path, spec: BuildSpec, limits: str, compiled: Mapping[str, CompiledModel],
                 pipeline: PipelineResult | None) -> None:
    """``limits``: the request limits as the build describes them (builder.source.limits.describe)."""
    lines = [
        f"# Build report: {spec.name}", "",
        f"Target `{spec.target}`. Quantized graphs are compared on held-out inputs (calibration samples are never "
        "among them) with the FP32 graph, or, for the LLM, with the checkpoint itself run in PyTorch (every form of it, "
        "FP32 too, is written from the shards and gated); a graph below the gate is never published.", "",
        f"Request {limits}.", "",
        "| component | precision | file | size | scheme | calibration samples | held-out | gate (worst output) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    details: list[str] = []
    for name, model in compiled.items():
        settled = model.quantization
        size = f"{model.bytes / 1e6:.2f} MB"
        if settled is None or not settled.attempts:
            lines.append(f"| {name} | {model.precision} | {model.path.name} | {size} | fp32 (exported) | - | - | export parity: "
                         f"{model.graph.parity.summary()} |")
            continue
        final = settled.final
        gate = final.gate.summary() if final.gate else "reference (FP32)"
        precision = settled.precision if not settled.fell_back else f"{settled.precision} (asked {settled.requested})"
        samples = str(settled.calibration_samples) if final.precision == "int8" and name != LLM.name else "-"
        lines.append(f"| {name} | {precision} | {model.path.name} | {size} | {final.label()} | {samples} | "
                     f"{settled.holdout_samples} | {gate} |")
        details.append(f"### {name}")
        for number, attempt in enumerate(settled.attempts, 1):
            verdict = "used" if attempt is final else "rejected"
            figures = attempt.gate.summary() if attempt.gate else "FP32 reference"
            details.append(f"{number}. {attempt.label()}: {figures} ({verdict})")
            if attempt.agreement is not None:
                details.append(f"   - {attempt.agreement.summary()}")
            if attempt.excluded:
                details.append(f"   - kept in float: {', '.join(f'`{n}`' for n in attempt.excluded)}")
            if attempt.gate is not None:
                details.extend(f"   - `{o.name}`: cos {o.cosine:.5f}, max|err| {o.max_abs_error:.3g}, mean|err| {o.mean_abs_error:.3g}"
                               for o in attempt.gate.outputs)
        details.append("")
    lines += [f"\nLLM KV cache: {m.kv_cache}." for m in compiled.values() if m.kv_cache]
    if pipeline is not None:
        gate = spec.quantize.pipeline_gate
        cosine = f", logits cos >= {gate.min_cosine}" if gate.min_cosine is not None else ""
        lines += ["", "## Pipeline gate", "",
                  f"The quantized pipeline against the FP32 one on held-out requests, teacher-forced over 32 positions "
                  f"(gate: agreement >= {gate.min_agreement:.0%}{cosine} per kind), measured on {pipeline.cpu}: "
                  f"**{'passed' if pipeline.figures.passed else 'failed'}**.", "",
                  "| request | agreement | logits cos (worst) |", "| --- | --- | --- |",
                  *(f"| {k.kind} | {k.agreement.agreement:.1%} | {k.agreement.logits.cosine:.5f} |" for k in pipeline.figures.kinds)]
        lines += ["", *(f"- {step}" for step in pipeline.steps)] if pipeline.steps else []
    if details:
        lines += ["", "## Quantization, step by step", "", *details]
    path.write_text("\n".join(lines) + "\n")
