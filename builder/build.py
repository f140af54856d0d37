"""The whole build: source -> export -> quantize -> compile -> repository, each stage cached, published atomically.

:func:`resolve` makes the one :class:`BuildContext` (target, source, family, facts, limits); each component then
goes through the stages as a :class:`ComponentItem` carrying its cache keys, and the target's backends decide
its quantized forms, what compiling makes of it and the Triton models that serve it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from builder.cache import Stage, StageCache, tool_versions
from builder.compile.artifacts import CompiledModel
from builder.compile.stage import CompileContext
from builder.components import AUDIO_ENCODER, COMPONENTS, LLM, VISION_ENCODER, Component
from builder.errors import BuildError
from builder.export.graph import ExportedGraph, load_exported
from builder.export.precision import ExportDtype, export_dtype
from builder.quantize.calibration_data import CalibrationFiles, calibration_files
from builder.quantize.pipeline import PipelineResult
from builder.quantize.ladder import Settled
from builder.quantize.stage import QUANTIZE, is_quantized, quantize_components, quantize_key
from builder.repository.assemble import assemble_repository
from builder.repository.plan import plan_repository
from builder.repository.publish import publish, staging_directory
from builder.repository.report import write_report
from builder.runtime.model_facts import ModelFacts
from builder.serve.tritonserver import NGC_IMAGE, TRITON_VERSION
from builder.source.chat_files import read_chat_prompt
from builder.source.checkpoint import Checkpoint, SourceModel, check_checkpoint
from builder.source.limits import checkpoint_limits, describe
from builder.source.preflight import Preflight, estimate
from builder.source.resolve import ResolvedSource, resolve_source
from builder.source.tokenizer_files import serving_tokenizer
from builder.spec import BuildSpec
from builder.targets import EncoderBackend, LlmBackend, Target, target_for, without_gpu


T = TypeVar("T")
FACTS = Stage("source", ("families", "source"))  # what serving needs to know of the checkpoint
EXPORT = Stage("export", ("export", "source", "families"))  # a component's ONNX graph, checked against PyTorch
# The published repository's key (manifest.json): an unchanged build rebuilds nothing.
REPOSITORY = Stage("repository", ("repository", "runtime", "compile", "families", "source", "targets", "templates"))


@dataclass(frozen=True)
class BuildResult:
    output: Path
    rebuilt: tuple[str, ...]
    reused: tuple[str, ...]
    published: bool
    seconds: float
    spec: BuildSpec  # as built: every limit set (those the spec left unset follow the checkpoint)
    preflight: Preflight | None = None  # set when the checkpoint was loaded

    def summary(self) -> str:
        if not self.published:
            return f"{self.output} is up to date: nothing rebuilt ({self.seconds:.1f} s)"
        rebuilt = ", ".join(self.rebuilt) or "nothing"
        reused = f"; reused {', '.join(self.reused)}" if self.reused else ""
        memory = ""
        if self.preflight is not None:  # ru_maxrss is in KiB on Linux
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            memory = f"; peak RAM {peak / 1e9:.1f} GB (pre-flight estimate {self.preflight.peak_ram / 1e9:.1f} GB)"
        return f"built {self.output} in {self.seconds:.1f} s: rebuilt {rebuilt}{reused}{memory}"


@dataclass(frozen=True)
class BuildContext:
    """What a build resolves once, before any stage runs: the stages read it, none resolves it again."""

    spec: BuildSpec  # every limit set (those the spec left unset follow the checkpoint)
    target: Target
    compiling: CompileContext
    cache: StageCache
    source: ResolvedSource
    checkpoint: Checkpoint  # its family resolved once
    tokenizer: Path
    facts: ModelFacts  # less the encoders the spec turns off
    components: tuple[Component, ...]  # those this model has and the spec keeps


@dataclass(frozen=True)
class ComponentItem:
    """One component as it goes through the stages: what it asks for, the keys its cache entries have, and what
    each stage made of it."""

    component: Component
    precision: str
    dtype: ExportDtype
    export_key: str
    quantize_key: str
    graph: ExportedGraph | None = None  # exported (or read from the cache), checked against PyTorch
    settled: Settled | None = None  # what the quantize stage settled on (FP32 and FP16 pass through)
    compiled: CompiledModel | None = None  # what the target's backend loads

    @property
    def name(self) -> str:
        return self.component.name

    @property
    def written_by_quantize(self) -> bool:
        """An INT8 / INT4 LLM: the quantize stage writes its every graph from the shards; the export records its
        signature alone, and reads no model for it."""
        return self.component is LLM and is_quantized(self.precision)


def resolve(spec: BuildSpec, output: Path, cache_dir: Path) -> BuildContext:
    """The target, the source and its facts; stops at the first thing this machine or checkpoint cannot do."""
    target = target_for(spec)
    cache = StageCache(cache_dir)
    compiling = target.prepare(spec, cache, output, without_gpu())  # a GPU target on a machine without one stops here
    source = resolve_source(spec.source, cache)
    checkpoint = check_checkpoint(source.checkpoint)
    tokenizer = serving_tokenizer(source.checkpoint, cache)  # the checkpoint's, or converted from tekken.json once
    facts = served_facts(spec, _checkpoint_facts(checkpoint, source.fingerprint, tokenizer, cache))
    components = tuple(c for c in COMPONENTS.values() if c.media is None or getattr(facts, c.media) is not None)
    reasons = target.check_model([c.name for c in components], facts)
    if reasons:
        raise BuildError("; ".join(reasons))
    spec = checkpoint_limits(spec, facts)
    return BuildContext(spec, target, dataclasses.replace(compiling, spec=spec, facts=facts), cache, source,
                        checkpoint, tokenizer, facts, components)


def build(spec: BuildSpec, output: Path, cache_dir: Path, progress: bool = True) -> BuildResult:
    started = time.perf_counter()
    _check_writable(output)
    ctx = resolve(spec, output, cache_dir)
    spec, cache, facts = ctx.spec, ctx.cache, ctx.facts
    quantized = any(is_quantized(getattr(spec.components, c.spec_key).precision) for c in ctx.components)
    files = (calibration_files(spec, VISION_ENCODER in ctx.components, AUDIO_ENCODER in ctx.components)
             if quantized else None)
    items = [_item(ctx, c, files) for c in ctx.components]
    repo_key = REPOSITORY.key([i.quantize_key for i in items], spec.target, spec.section("limits"), spec.section("triton"),
                              ctx.compiling.fingerprint)
    if _published_key(output) == repo_key:
        return BuildResult(output, (), tuple(i.name for i in items), False, time.perf_counter() - started, spec)

    rebuilt = [
        i.name for i in items
        if EXPORT.lookup(cache, i.name, i.export_key) is None
        or (is_quantized(i.precision) and QUANTIZE.lookup(cache, i.name, i.quantize_key) is None)
    ]
    loaded: SourceModel | None = None
    preflight = None
    if progress:
        tqdm.write(describe(spec.limits, facts))
    if rebuilt:  # an export or a quantize stage will run: the checkpoint is read, graphs are held
        llm = next(i for i in items if i.component is LLM)
        preflight = estimate(list(ctx.checkpoint.weight_files), cache_dir, llm.precision, quantized)
        preflight.check()
        if progress:
            tqdm.write(f"pre-flight: {preflight.summary()}")
    for index, item in enumerate(tqdm(items, desc="export + parity", unit="graph", disable=not progress)):
        if EXPORT.lookup(cache, item.name, item.export_key) is None and loaded is None and not item.written_by_quantize:
            llm_dtype = next(i.dtype for i in items if i.component is LLM)  # an FP16 build's encoders load in FP16
            loaded = ctx.checkpoint.load(llm_dtype, ctx.tokenizer, layers_on_demand=True)
        entry = EXPORT.run(cache, item.name, item.export_key, lambda tmp, item=item: _export(ctx, loaded, item, tmp))
        items[index] = dataclasses.replace(item, graph=load_exported(entry))
    del loaded  # the encoders and embeddings: the later stages read the graphs alone

    with staging_directory(output) as staging, tempfile.TemporaryDirectory() as scratch:
        # The serving files first: calibration and the gates preprocess exactly as the server will.
        shared = _shared_files(ctx, Path(scratch))
        settled, pipeline = quantize_components(
            spec, ctx.checkpoint.directory, facts, shared["tokenizer.json"], {i.name: _done(i.graph) for i in items},
            {i.name: i.precision for i in items}, {i.name: i.export_key for i in items}, files,
            (ctx.target.encoders, ctx.target.llm), cache, progress)
        items = [_compiled(ctx, dataclasses.replace(i, settled=settled[i.name])) for i in items]
        compiled = {i.name: _done(i.compiled) for i in items}
        plans = plan_repository(spec, facts, compiled, shared, ctx.target.encoders, ctx.target.llm)
        assemble_repository(plans, staging, _manifest(spec, repo_key, ctx.source.fingerprint, compiled, pipeline))
        write_report(staging / "build_report.md", spec, describe(spec.limits, facts), compiled, pipeline)
        publish(staging, output)
    return BuildResult(output, tuple(rebuilt), tuple(i.name for i in items if i.name not in rebuilt), True,
                       time.perf_counter() - started, spec, preflight)


def _item(ctx: BuildContext, component: Component, files: CalibrationFiles | None) -> ComponentItem:
    """The component's precision and the keys of its export and quantize entries."""
    precision = getattr(ctx.spec.components, component.spec_key).precision
    dtype = export_dtype(precision)
    limits = {k: getattr(ctx.spec.limits, k) for k in component.export_limits}
    export_key = EXPORT.key(ctx.source.fingerprint, component.name, dtype, ctx.spec.section("export"), limits)
    return ComponentItem(component, precision, dtype, export_key, quantize_key(ctx.spec, export_key, precision, files))


def _compiled(ctx: BuildContext, item: ComponentItem) -> ComponentItem:
    """The settled graph as the target's backend for this component compiles it."""
    graph, settled = _done(item.graph), _done(item.settled)
    backend: EncoderBackend | LlmBackend = ctx.target.llm if item.component is LLM else ctx.target.encoders
    compiled = backend.compile(ctx.compiling, dataclasses.replace(graph, path=settled.path), settled.precision)
    return dataclasses.replace(item, compiled=dataclasses.replace(compiled, quantization=settled))


def _done(made: T | None) -> T:
    """What an earlier stage made of an item (every stage runs in order, so it is there)."""
    assert made is not None, "a stage ran before the one it follows"
    return made


def _checkpoint_facts(checkpoint: Checkpoint, fingerprint: str, tokenizer: Path, cache: StageCache) -> ModelFacts:
    """read_facts, kept in the cache: reading them imports transformers, which a no-op build should not wait for."""
    key = FACTS.key(fingerprint, str(tokenizer))
    entry = FACTS.run(cache, "facts", key, lambda tmp: checkpoint.read_facts(tokenizer).save(tmp / "model_facts.json"))
    return ModelFacts.load(entry / "model_facts.json")


def served_facts(spec: BuildSpec, facts: ModelFacts) -> ModelFacts:
    """The checkpoint's facts less the encoders the spec turns off: the server refuses their media."""
    return dataclasses.replace(
        facts, image=facts.image if spec.components.vision.enabled else None,
        audio=facts.audio if spec.components.audio.enabled else None,
    )


def _export(ctx: BuildContext, source: SourceModel | None, item: ComponentItem, directory: Path) -> None:
    """An encoder by torch.onnx from its module; the LLM written from the checkpoint's shards, layer by layer (an
    INT8 / INT4 one by the quantize stage: here its signature alone)."""
    from builder.export.onnx_export import export_graph
    from builder.export.streamed import export_streamed_llm, record_quantized_llm

    if item.written_by_quantize:
        record_quantized_llm(ctx.checkpoint.directory, directory, ctx.spec.export, ctx.spec.limits)
        return
    assert source is not None, "the checkpoint is loaded before any export runs"
    (recipe,) = ctx.checkpoint.family.recipes(source, ctx.spec.limits, [item.name])
    if item.component is LLM:
        export_streamed_llm(recipe, ctx.checkpoint.directory, directory, ctx.spec.export, ctx.spec.limits, item.dtype)
    else:
        export_graph(recipe, directory, ctx.spec.export, item.dtype)


def _shared_files(ctx: BuildContext, scratch: Path) -> dict[str, Path]:
    """The files several models carry; copied, so the repository never shares an inode with the checkpoint."""
    ctx.facts.save(scratch / "model_facts.json")
    shutil.copyfile(ctx.tokenizer, scratch / "tokenizer.json")
    chat = read_chat_prompt(ctx.checkpoint.directory, ctx.tokenizer, ctx.checkpoint.family.DEFAULT_CHAT_TEMPLATE)
    written = chat.save(scratch)
    return {"model_facts.json": scratch / "model_facts.json", "tokenizer.json": scratch / "tokenizer.json",
            **{path.name: path for path in written}}


def _manifest(spec: BuildSpec, repo_key: str, source_fingerprint: str, compiled: dict[str, CompiledModel],
              pipeline: PipelineResult | None) -> dict:
    return {
        "repository_key": repo_key,
        "spec": {k: v for k, v in dataclasses.asdict(spec).items() if k != "path"},
        "source_fingerprint": source_fingerprint,
        "tools": tool_versions(),
        "serving": {"tritonserver": TRITON_VERSION, "image": NGC_IMAGE},
        "components": {
            name: {
                "precision": model.precision,
                "file": model.path.name,
                "bytes": model.bytes,
                "parity": dataclasses.asdict(model.graph.parity) if model.graph.parity else None,  # None: gated
                "quantization": model.quantization.to_json() if model.quantization else None,
                **model.manifest_extra(),
            }
            for name, model in compiled.items()
        },
        "pipeline_gate": pipeline.to_json() if pipeline else None,  # None: nothing quantized
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _published_key(output: Path) -> str | None:
    try:
        return json.loads((output / "manifest.json").read_text()).get("repository_key")
    except (OSError, ValueError):
        return None


def _check_writable(output: Path) -> None:
    parent = output.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BuildError(f"cannot write {output}: {parent} is a file, not a directory")
    if output.exists() and not output.is_dir():
        raise BuildError(f"{output.resolve()} exists and is not a directory")
    if not os.access(parent, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        reason = "read-only file system" if os.statvfs(parent).f_flag & os.ST_RDONLY else "permission denied"
        raise BuildError(f"cannot write {output}: {reason}")
