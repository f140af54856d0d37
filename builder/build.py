"""The whole build: source -> export -> quantize -> compile -> repository, each stage cached, published atomically."""

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

from tqdm import tqdm

from builder.cache import StageCache, code_fingerprint, make_key, tool_versions
from builder.compile.artifacts import CompiledModel
from builder.compile.targets import prepare_target
from builder.components import COMPONENTS, LLM
from builder.errors import BuildError
from builder.export.graph import ExportedGraph, load_exported
from builder.export.precision import ExportDtype, export_dtype
from builder.families import family_for
from builder.quantize.calibration_data import calibration_files
from builder.quantize.pipeline import PipelineResult
from builder.quantize.stage import is_quantized, quantize_components, quantize_key
from builder.repository.assemble import assemble_repository
from builder.repository.plan import plan_repository
from builder.repository.publish import publish, staging_directory
from builder.repository.report import write_report
from builder.runtime.model_facts import ModelFacts
from builder.serve.tritonserver import NGC_IMAGE, TRITON_VERSION
from builder.source.chat_files import read_chat_prompt
from builder.source.checkpoint import SourceModel, check_checkpoint_files, load_checkpoint, read_facts
from builder.source.limits import checkpoint_limits, describe
from builder.source.preflight import Preflight, estimate
from builder.source.resolve import resolve_source
from builder.source.tokenizer_files import serving_tokenizer
from builder.spec import BuildSpec


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


def build(spec: BuildSpec, output: Path, cache_dir: Path, progress: bool = True) -> BuildResult:
    started = time.perf_counter()
    _check_writable(output)
    target = prepare_target(spec, cache_dir, output)  # stops at once if this machine cannot build spec.target
    cache = StageCache(cache_dir)
    source = resolve_source(spec.source, cache)
    weight_files = check_checkpoint_files(source.checkpoint)
    tokenizer = serving_tokenizer(source.checkpoint, cache)  # the checkpoint's, or converted from tekken.json once
    facts = served_facts(spec, _checkpoint_facts(source.checkpoint, source.fingerprint, tokenizer, cache))
    spec = checkpoint_limits(spec, facts)
    target = dataclasses.replace(target, image=facts.image)
    components = [c.name for c in COMPONENTS.values() if c.media is None or getattr(facts, c.media) is not None]
    precisions = {c: getattr(spec.components, COMPONENTS[c].spec_key).precision for c in components}
    dtypes = {c: export_dtype(p) for c, p in precisions.items()}
    keys = {c: _export_key(spec, c, dtypes[c], source.fingerprint) for c in components}
    quantized = any(map(is_quantized, precisions.values()))
    files = calibration_files(spec, "vision_encoder" in components, "audio_encoder" in components) if quantized else None
    quantize_keys = {c: quantize_key(spec, keys[c], precisions[c], files) for c in components}
    repo_key = make_key(quantize_keys, spec.target, spec.section("limits"), spec.section("triton"),
                        code_fingerprint("repository", "runtime", "compile", "families", "source"), _templates_fingerprint(),
                        target.fingerprint)
    if _published_key(output) == repo_key:
        return BuildResult(output, (), tuple(components), False, time.perf_counter() - started, spec)

    rebuilt = [
        c for c in components
        if cache.lookup("export", c, keys[c]) is None
        or (precisions[c] != "fp32" and cache.lookup("quantize", c, quantize_keys[c]) is None)
    ]
    exported: dict[str, ExportedGraph] = {}
    loaded: SourceModel | None = None
    preflight = None
    if progress:
        tqdm.write(describe(spec.limits, facts))
    if any(cache.lookup("export", c, keys[c]) is None for c in components):  # the checkpoint will be loaded
        preflight = estimate(weight_files, cache_dir, dtypes[LLM.name], extra_copy=quantized)
        preflight.check()
        if progress:
            tqdm.write(f"pre-flight: {preflight.summary()}")
    for component in tqdm(components, desc="export + parity", unit="graph", disable=not progress):
        entry = cache.lookup("export", component, keys[component])
        if entry is None:
            if loaded is None:  # in the LLM's dtype: it holds nearly all the weights
                loaded = load_checkpoint(source.checkpoint, dtypes[LLM.name], tokenizer)
            entry = _export(loaded, spec, component, dtypes[component], cache, keys[component])
        exported[component] = load_exported(entry)

    with staging_directory(output) as staging, tempfile.TemporaryDirectory() as scratch:
        # The serving files first: calibration and the gates preprocess exactly as the server will.
        shared = _shared_files(source.checkpoint, tokenizer, facts, Path(scratch))
        settled, pipeline = quantize_components(spec, facts, shared["tokenizer.json"], exported, precisions, keys,
                                                files, cache, progress)
        compiled = {
            c: dataclasses.replace(target.compile(dataclasses.replace(g, path=settled[c].path), settled[c].precision),
                                   quantization=settled[c])
            for c, g in exported.items()
        }
        plans = plan_repository(spec, facts, compiled, shared)
        assemble_repository(plans, staging, _manifest(spec, repo_key, source.fingerprint, compiled, pipeline))
        write_report(staging / "build_report.md", spec, describe(spec.limits, facts), compiled, pipeline)
        publish(staging, output)
    return BuildResult(output, tuple(rebuilt), tuple(c for c in components if c not in rebuilt), True,
                       time.perf_counter() - started, spec, preflight)


def _checkpoint_facts(checkpoint: Path, fingerprint: str, tokenizer: Path, cache: StageCache) -> ModelFacts:
    """read_facts, kept in the cache: reading them imports transformers, which a no-op build should not wait for."""
    key = make_key(fingerprint, str(tokenizer), code_fingerprint("families", "source"), tool_versions())
    entry = cache.lookup("source", "facts", key)
    if entry is None:
        with cache.writer("source", "facts", key) as tmp:
            read_facts(checkpoint, tokenizer).save(tmp / "model_facts.json")
        entry = cache.entry("source", "facts", key)
    return ModelFacts.load(entry / "model_facts.json")


def served_facts(spec: BuildSpec, facts: ModelFacts) -> ModelFacts:
    """The checkpoint's facts less the encoders the spec turns off: the server refuses their media."""
    return dataclasses.replace(
        facts, image=facts.image if spec.components.vision.enabled else None,
        audio=facts.audio if spec.components.audio.enabled else None,
    )


def _export_key(spec: BuildSpec, component: str, dtype: str, source_fingerprint: str) -> str:
    limits = {k: getattr(spec.limits, k) for k in COMPONENTS[component].export_limits}
    return make_key(
        component, dtype, source_fingerprint, spec.section("export"), limits, tool_versions(),
        code_fingerprint("export", "source", "families"),
    )


def _export(source: SourceModel, spec: BuildSpec, component: str, dtype: ExportDtype, cache: StageCache, key: str) -> Path:
    from builder.export.onnx_export import export_graph

    (recipe,) = family_for(source.directory).recipes(source, spec.limits, [component])
    with cache.writer("export", component, key) as tmp:
        export_graph(recipe, tmp, spec.export, dtype)
    return cache.entry("export", component, key)


def _shared_files(checkpoint: Path, tokenizer: Path, facts: ModelFacts, scratch: Path) -> dict[str, Path]:
    """The files several models carry; copied, so the repository never shares an inode with the checkpoint."""
    facts.save(scratch / "model_facts.json")
    shutil.copyfile(tokenizer, scratch / "tokenizer.json")
    chat = read_chat_prompt(checkpoint, tokenizer, family_for(checkpoint).DEFAULT_CHAT_TEMPLATE)
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
                "bytes": model.path.stat().st_size,
                "parity": dataclasses.asdict(model.graph.parity),
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


def _templates_fingerprint() -> str:
    from builder.repository.render import TEMPLATES

    return make_key([(p.name, p.read_text()) for p in sorted(TEMPLATES.glob("*.j2"))])


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
