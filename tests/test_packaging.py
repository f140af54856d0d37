"""The builder installs without its source tree: the wheel carries the templates, the calibration set and
the runtime's requirements (package data, through builder/templates and builder/calibration)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import ROOT


def test_the_wheel_carries_templates_calibration_data_and_runtime_requirements(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("mm_triton_builder-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {f"builder/templates/{p.name}" for p in (ROOT / "templates").glob("*.j2")}
    calibration = {f"builder/calibration/{p.relative_to(ROOT / 'data' / 'calibration').as_posix()}"
                   for p in (ROOT / "data" / "calibration").rglob("*") if p.is_file()}
    assert templates and templates <= names
    assert len(calibration) > 20 and calibration <= names
    assert {"builder/runtime/requirements.txt", "builder/repository/python_models/entry_point.py"} <= names
