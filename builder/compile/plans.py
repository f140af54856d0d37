"""TensorRT plans per GPU architecture: naming, the manifest record, and plans carried between builds.

Building on a second GPU architecture adds its plan next to the first one's: the repository's
manifest says which plans it holds and what built them. A plan is carried into the new repository
only if it was built from the same ONNX graph, and never if that would mix TensorRT versions (a
plan only loads in the TensorRT version that built it).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.compare import GateResult
from builder.errors import BuildError


@dataclass(frozen=True)
class Device:
    name: str
    compute_capability: str  # "8.9"
    driver: str
    tensorrt: str  # the version that builds (and must run) the plans

    @property
    def plan_file(self) -> str:
        return f"model_sm{self.compute_capability.replace('.', '')}.plan"


@dataclass(frozen=True)
class PlanRecord:
    file: str
    compute_capability: str
    gpu: str
    driver: str
    tensorrt: str
    onnx_sha256: str
    comparison: GateResult  # the plan against ONNX Runtime FP32
    path: Path  # where the plan is now (build cache, or the published repository)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("path")
        return data


def plan_record(device: Device, onnx_sha256: str, comparison: GateResult, path: Path) -> PlanRecord:
    return PlanRecord(device.plan_file, device.compute_capability, device.name, device.driver, device.tensorrt,
                      onnx_sha256, comparison, path)


def published_plans(repository: Path, component: str, model: str) -> list[PlanRecord]:
    """The plans of ``component`` that the repository's manifest lists and that are on disk in ``model/1``."""
    try:
        manifest = json.loads((repository / "manifest.json").read_text())
    except (OSError, ValueError):
        return []
    entries = manifest.get("components", {}).get(component, {}).get("plans", [])
    records = []
    for raw in entries:
        path = repository / model / "1" / raw["file"]
        if path.is_file():
            records.append(PlanRecord(**{**raw, "comparison": GateResult.from_json(raw["comparison"]), "path": path}))
    return records


def carried_plans(previous: list[PlanRecord], device: Device, onnx_sha256: str, repository: Path) -> list[PlanRecord]:
    """Plans of other architectures to keep beside this build's. Plans of another graph are stale
    (dropped, with a note); plans of another TensorRT version stop the build."""
    carried = []
    for record in previous:
        if record.compute_capability == device.compute_capability:
            continue  # this build replaces it
        if record.onnx_sha256 != onnx_sha256:
            print(f"note: dropping {record.file} (sm {record.compute_capability}): built from another ONNX graph",
                  file=sys.stderr)
            continue
        if record.tensorrt != device.tensorrt:
            raise BuildError(
                f"{repository} holds {record.file} built with TensorRT {record.tensorrt} and this machine has "
                f"TensorRT {device.tensorrt}: one repository cannot mix TensorRT versions; build every "
                f"architecture with one version, or publish to a new --output"
            )
        carried.append(record)
    return carried


def cc_model_filenames(plans: list[PlanRecord] | tuple[PlanRecord, ...]) -> dict[str, str]:
    """Triton's ``cc_model_filenames``: needed only when plans for several architectures are present."""
    return {p.compute_capability: p.file for p in plans} if len(plans) > 1 else {}
