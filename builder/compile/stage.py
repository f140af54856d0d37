"""The compile stage: turns each exported (and quantized) ONNX graph into what a backend loads.

- a backend that runs ONNX graphs (ONNX Runtime in Python or in Triton's backend): the graph itself
  (:func:`as_exported`);
- a TensorRT backend: a plan per GPU architecture (:func:`compile_plan`), built strongly typed with
  optimization profiles from the spec, checked against ONNX Runtime FP32 and cached under a key of its inputs.

Which one a component takes is its backend's choice (``builder/targets``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.cache import Stage, StageCache
from builder.compare import Feeds, GateResult
from builder.compile.artifacts import CompiledModel
from builder.compile.compare import sample_feeds
from builder.compile.plans import Device, carried_plans, plan_record, published_plans
from builder.compile.profiles import Profile, check_profiles, check_request_fits, input_axes, profiles_for, request_ranges
from builder.components import LLM
from builder.errors import BuildError
from builder.export.graph import ExportedGraph
from builder.onnx_files import graph_files, graph_sha256
from builder.runtime.contract import LOGITS
from builder.runtime.model_facts import ModelFacts
from builder.spec import BuildSpec


TENSORRT = Stage("tensorrt", ("compile",))  # a plan for one GPU architecture
IN_PLACE_LLM = Stage("in_place_llm", ("compile", "runtime"))  # the LLM graph with its attention fused, for ONNX Runtime


@dataclass(frozen=True)
class CompileContext:
    """What compiling needs beside the graph; made once per build by the target (``Target.prepare``)."""

    spec: BuildSpec
    cache: StageCache
    output: Path  # the repository being (re)built: other GPUs' plans are carried over from it
    device: Device | None = None  # a target that compiles for a GPU: the one this build runs on
    facts: ModelFacts | None = None  # the checkpoint's: the vision plan's height/width ranges, the LLM's cache shape

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What, besides the spec, decides the compiled files: the GPU and TensorRT for plans."""
        return {**dataclasses.asdict(self.device), **self.spec.section("tensorrt")} if self.device else {}


def as_exported(graph: ExportedGraph, precision: str) -> CompiledModel:
    """A backend that runs ONNX graphs (ONNX Runtime in Python or in Triton's backend) serves the graph itself."""
    return CompiledModel(graph.component, graph.path, precision, graph)


def in_place_llm(context: CompileContext, graph: ExportedGraph, precision: str) -> CompiledModel:
    """The LLM graph with its KV cache updated in place (:mod:`builder.compile.ort_llm_graph`), checked against the
    graph it was made from through the server's runner and cached; its weight files are the graph's, linked."""
    from builder.compile.ort_llm_graph import FusedCheck, check_fused, write_fused

    assert graph.path is not None and graph.attention is not None and context.facts is not None
    source, layout, facts, export = graph.path, graph.attention, context.facts, context.spec.export
    identity = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in graph_files(source)]  # cache entries: immutable
    key = IN_PLACE_LLM.key(identity, dataclasses.asdict(layout), precision, context.spec.section("export"),
                           context.spec.limits.max_context, context.spec.quantize.llm_gate.min_cosine)

    def fuse_into(tmp: Path) -> None:
        fused = write_fused(source, tmp, layout, context.spec.limits.max_context)
        # FP32 by the export's tolerances, FP16 by its cosine; the integer forms by the LLM gate's cosine: their
        # MatMuls quantize their activations, so a last-digit difference in an input moves results by quantization
        # steps (a 6B INT4 graph of random weights: cos 0.9986), and the gate is what the build promises for them.
        # The fusion itself is precision-blind; FP32 graphs check it at the tolerances (tests/test_in_place_kv.py).
        min_cosine = {"fp32": None, "fp16": export.fp16_min_cosine}.get(precision, context.spec.quantize.llm_gate.min_cosine)
        check = check_fused(source, fused, facts, export.atol, export.rtol, min_cosine)
        if check.failure is not None:
            raise BuildError(f"{graph.component}: {check.summary()}")
        (tmp / "check.json").write_text(json.dumps(dataclasses.asdict(check)))

    entry = IN_PLACE_LLM.run(context.cache, graph.component, key, fuse_into)
    check = FusedCheck(**json.loads((entry / "check.json").read_text()))
    return CompiledModel(graph.component, entry / "model.onnx", precision, graph,
                         kv_cache=f"in place (GroupQueryAttention, one buffer per KV tensor); {check.summary()}")


def compile_plan(context: CompileContext, graph: ExportedGraph, precision: str, served_by: str) -> CompiledModel:
    """A TensorRT plan for this GPU, built strongly typed with the spec's profiles, checked against ONNX Runtime
    and cached; ``served_by``: the Triton model that loads it, whose plans for other GPUs are carried over."""
    from builder.compile.tensorrt_build import build_plan, compare_plan

    assert context.device is not None, "compile_plan needs the device Target.prepare found"
    component, spec, device = graph.component, context.spec, context.device
    profiles = profiles_for(component, spec, context.facts.image if context.facts else None)
    check_profiles(component, profiles, spec.triton.max_batch_size)  # llm: max_decode_batch
    check_request_fits(component, profiles, request_ranges(component, spec))
    onnx_sha256 = graph_sha256(graph.path)  # its weights too
    key = TENSORRT.key(onnx_sha256, [dataclasses.asdict(p) for p in profiles], device.compute_capability,
                       device.tensorrt, spec.section("tensorrt"), spec.section("quantize"))

    def build_into(tmp: Path) -> None:
        gate = spec.quantize.llm_gate if component == LLM.name else spec.quantize.gate  # the same figures
        timing = context.cache.root / TENSORRT.name / f"timing-{device.tensorrt}-{device.plan_file}.cache"
        build_plan(graph.path, profiles, tmp / device.plan_file, timing)
        # The reference is the graph the plan was built from, run by ONNX Runtime; a quantized
        # graph was itself gated against the FP32 export by the quantize stage.
        comparison = compare_plan(tmp / device.plan_file, graph.path,
                                  comparison_feeds(graph, profiles, spec.tensorrt.comparison_samples), gate)
        if not comparison.passed:
            raise BuildError(f"{component}: the TensorRT engine disagrees with its ONNX graph under ONNX Runtime: "
                             f"{comparison.summary()}")
        (tmp / "comparison.json").write_text(json.dumps(comparison.to_json()))

    entry = TENSORRT.run(context.cache, component, key, build_into)
    comparison = GateResult.from_json(json.loads((entry / "comparison.json").read_text()))
    record = plan_record(device, onnx_sha256, comparison, entry / device.plan_file)
    previous = published_plans(context.output, component, served_by)
    carried = carried_plans(previous, device, onnx_sha256, context.output)
    return CompiledModel(component, record.path, precision, graph, plans=(record, *carried))


def comparison_feeds(graph: ExportedGraph, profiles: tuple[Profile, ...], samples: int) -> list[list[Feeds]]:
    """``samples`` inputs per profile, at the profile's opt shapes."""
    axes = input_axes(graph.path)
    vocab = graph.output(LOGITS).dims[-1] if graph.component == LLM.name else 2
    return [
        [sample_feeds(graph.inputs, profile.shapes(axes), vocab, seed) for seed in range(samples)]
        for profile in profiles
    ]
