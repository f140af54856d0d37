"""Writes a planned repository into a staging directory: configs, model.py files, graphs, manifest."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from builder.onnx_files import copy_onnx, link_or_copy
from builder.repository.plan import ModelPlan
from builder.repository.render import parse_config, render_config
from builder.repository.validate import check_ensembles, check_graph_signature

PYTHON_MODELS = Path(__file__).resolve().parent / "python_models"
RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
# The name every model.py imports the runtime by: a copy beside it in the version directory, which the
# Python backend puts on sys.path, so the repository runs where this builder is not installed.
RUNTIME_PACKAGE = "mmtb_runtime"
# What a Python model that runs steps itself reads them from: [{"model", "inputs", "outputs"}, ...] in order.
STEPS_FILE = "steps.json"


def render_model_config(plan: ModelPlan) -> str:
    text = render_config(
        plan.template, name=plan.name, inputs=plan.inputs, outputs=plan.outputs, parameters=plan.parameters,
        max_batch_size=plan.max_batch_size, decoupled=plan.decoupled, instances=plan.instances,
        dynamic_batching=plan.dynamic_batching, max_queue_delay_us=plan.max_queue_delay_us, steps=plan.steps,
        **plan.template_options,
    )
    config = parse_config(text, plan.name)
    if config.name != plan.name:  # the parse proves syntax; this catches a template that ignores its input
        raise AssertionError(f"template {plan.template} rendered name {config.name!r} for {plan.name!r}")
    return text


def assemble_repository(plans: list[ModelPlan], staging: Path, manifest: dict[str, Any]) -> None:
    check_ensembles(plans)
    for plan in plans:
        check_graph_signature(plan)
        version = staging / plan.name / "1"
        version.mkdir(parents=True)
        (staging / plan.name / "config.pbtxt").write_text(render_model_config(plan))
        if plan.python_model:
            shutil.copyfile(PYTHON_MODELS / f"{plan.python_model}.py", version / "model.py")
            _copy_tree(RUNTIME, version / RUNTIME_PACKAGE)
            if plan.steps:
                (version / STEPS_FILE).write_text(json.dumps([dataclasses.asdict(step) for step in plan.steps], indent=2) + "\n")
        for name, source in plan.files.items():
            if source.suffix == ".onnx":  # with its external weights, if any
                copy_onnx(source, version / name)
            else:
                link_or_copy(source, version / name)
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def _copy_tree(source: Path, target: Path) -> None:
    """Like shutil.copytree without __pycache__, but the first failure (a full disk) raises as itself,
    not folded into one shutil.Error listing every file."""
    for path in sorted(source.rglob("*")):
        if "__pycache__" in path.parts or path.is_dir():
            continue
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)

