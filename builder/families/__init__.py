"""The family registry: one package per model type, the only code that knows a family.

A family package (``builder/families/<model_type>/``) reads a checkpoint's facts (token ids, processor parameters,
which encoders it has), loads its PyTorch modules and runs Hugging Face's own pipeline as the reference (its
``__init__``), and says how each component exports (its ``export`` module: wrappers and a ``RECIPES`` table).
Adding a family is one package here, its line in ``PACKAGES`` and its tests (``tests/test_family_registry.py``
fails while a registered family has no served-parity test).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from builder.errors import BuildError
from builder.families.base import Family

# The registry: one line per family package under builder/families/, each defining FAMILY.
PACKAGES = (
    "gemma3",
    "mistral3",
    "qwen2_5_vl",
    "qwen2_audio",
    "qwen25_omni",
    "voxtral",
)
FAMILIES: dict[str, Family] = {
    family.MODEL_TYPE: family for family in (importlib.import_module(f"{__name__}.{name}").FAMILY for name in PACKAGES)
}


def model_type(directory: Path) -> str:
    config_path = directory / "config.json"
    try:
        return str(json.loads(config_path.read_text()).get("model_type"))
    except json.JSONDecodeError as exc:
        raise BuildError(f"{config_path}: not valid JSON ({exc})") from None


def family_for(directory: Path) -> Family:
    """The family of a checkpoint directory, by its ``config.json``'s ``model_type``."""
    kind = model_type(directory)
    if kind not in FAMILIES:
        raise BuildError(
            f"{directory / 'config.json'}: unsupported architecture model_type={kind!r} "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[kind]
