"""The build targets, one module each; the spec, the CLI and every stage read their choices here.

To add a target: a module with its ``Target`` (and an ``engine_options`` if its engine template
needs more), registered below; a new ``compiles_to`` also needs its compiler in ``compile/``.
"""

from __future__ import annotations

from builder.targets.base import Target
from builder.targets.onnxruntime import ONNXRUNTIME
from builder.targets.python import PYTHON
from builder.targets.tensorrt import TENSORRT

TARGETS: dict[str, Target] = {t.name: t for t in (PYTHON, ONNXRUNTIME, TENSORRT)}

__all__ = ["TARGETS", "Target"]
