"""Renders a ``config.pbtxt`` from a Jinja template and proves it parses as Triton's ModelConfig."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from builder.errors import BuildError

# builder/templates links to the top-level templates/: one set of files, shipped as package data in a wheel.
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,  # a missing variable is a build failure, not an empty string
        keep_trailing_newline=True,
        autoescape=False,
    )


def render_config(template: str, **context: Any) -> str:
    try:
        return _environment().get_template(template).render(**context)
    except jinja2.TemplateError as exc:
        raise BuildError(f"template {template}: {exc}") from None


def parse_config(text: str, where: str) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise BuildError(f"{where}: rendered config.pbtxt is not a valid Triton ModelConfig: {exc}") from None
    return config
