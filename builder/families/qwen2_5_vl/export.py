"""Qwen2.5-VL's export: Qwen2.5-Omni's windowed vision recipe (the same tower) and the shared M-RoPE decoder."""

from __future__ import annotations

from builder.export.recipes import llm_recipe
from builder.families.qwen25_omni.export import windowed_vision_recipe

RECIPES = {"vision_encoder": windowed_vision_recipe, "llm": llm_recipe}
