"""The build targets, one module each: a target is an encoder backend and an LLM backend (``base``).

To add a target: a module with its backends (subclass ``EncoderBackend`` / ``LlmBackend``, or reuse
``PythonEncoders``, ``EngineEncoders``, ``OnnxRuntimeLlm``) and its ``Target``, registered below; its own
spec keys go in a section of the spec named after it (``settings``).
"""

from __future__ import annotations

from builder.errors import SpecError
from builder.spec import BuildSpec
from builder.targets.base import EncoderBackend, LlmBackend, Target, changed_keys
from builder.targets.onnxruntime import ONNXRUNTIME
from builder.targets.python import PYTHON
from builder.targets.tensorrt import TENSORRT

TARGETS: dict[str, Target] = {t.name: t for t in (PYTHON, ONNXRUNTIME, TENSORRT)}


def target_for(spec: BuildSpec) -> Target:
    """``spec.target``'s Target, after the spec rules that depend on it: another target's section left at its
    defaults, and the target's own rules."""
    if spec.target not in TARGETS:
        raise SpecError(f"target: {spec.target!r} is not one of {', '.join(TARGETS)}")
    for other in TARGETS.values():
        if other.settings is not None and other.name != spec.target:
            for key in changed_keys(spec, other.settings):
                raise SpecError(f"{other.settings}.{key}: applies to target {other.name} only")
    target = TARGETS[spec.target]
    target.check_spec(spec)
    return target


def without_gpu() -> str:
    return ", ".join(t.name for t in TARGETS.values() if not t.needs_gpu)


__all__ = ["TARGETS", "EncoderBackend", "LlmBackend", "Target", "target_for", "without_gpu"]
