"""The build spec: one YAML file, validated on load into typed dataclasses.

Every key is checked: an unknown or mistyped key, a value of the wrong type or out of range is a
``SpecError`` that names the key (``components.vison: unknown key (did you mean 'vision'?)``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from builder.errors import SpecError

Precision = Literal["fp32", "fp16", "int8", "int4"]  # int4: the LLM's weights only (builder/quantize/ladder.py)

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class SourceSpec:
    """Where the model comes from: the built-in ``tiny`` preset or a local checkpoint directory."""

    preset: Literal["tiny", "small"] | None = "tiny"  # builder/source/tiny.py
    checkpoint: str | None = None  # a Hugging Face ``save_pretrained`` directory (safetensors only)
    seed: int = 0  # seed of the tiny preset's random weights


@dataclass(frozen=True)
class ComponentSpec:
    enabled: bool = True
    precision: Precision = "fp32"


@dataclass(frozen=True)
class ComponentsSpec:
    vision: ComponentSpec = field(default_factory=ComponentSpec)
    audio: ComponentSpec = field(default_factory=ComponentSpec)
    llm: ComponentSpec = field(default_factory=ComponentSpec)


@dataclass(frozen=True)
class LimitsSpec:
    """Shape ranges of the build and per-request limits enforced by the server."""

    max_images: int = 4  # images per request
    max_image_bytes: int = 20_000_000
    max_image_pixels: int = 40_000_000
    max_audio_clips: int = 4  # encoder clips (fixed-length chunks) per request
    max_audio_bytes: int = 50_000_000
    # Unset (a spec without them, e.g. `make engines CHECKPOINT=dir`): they follow the checkpoint, as
    # builder/source/limits.py derives them (its context, its media's token cost), and the build prints them.
    max_prompt_tokens: int | None = None  # tokens of the prompt, placeholders included
    max_context: int | None = None  # prompt + generated tokens
    max_tokens: int | None = None  # cap on new tokens per request
    default_max_tokens: int = 32  # when a request does not say (at most max_tokens)


@dataclass(frozen=True)
class TritonSpec:
    instances: int = 1
    max_batch_size: int = 8  # requests whose media an encoder runs together; also the decode batch
    dynamic_batching: bool = True
    # How long an encoder's batcher holds a request for others to join it. 0: never; requests that
    # arrive while the encoder runs still go together. A delay fills batches at low load but adds up
    # to itself to every request's latency there (2 ms cost the tiny model a third of its c=1 speed).
    max_queue_delay_us: int = 0
    # Which client entry points to build: `ensemble` (unary) and/or `ensemble_stream` (decoupled).
    # Either way the LLM's weights are held once, by `llm`.
    entry_points: Literal["both", "unary", "streaming"] = "both"
    # KV of prompt prefixes that requests share (the system prompt), kept by `llm` and reused, LRU;
    # 0 turns it off. ONNX Runtime decode (targets python, onnxruntime); not yet the TensorRT runner.
    prefix_cache_mb: int = 256
    # KV cache positions `llm` lets its sequences reserve together (prompt + max_tokens each, when
    # admitted); beyond it requests wait in order, and are refused (UNAVAILABLE) after the timeout.
    # 0: max_batch_size x limits.max_context. Bytes per position: 2 x layers x kv_heads x head_dim x
    # the KV dtype's size (README, "Memory").
    kv_budget_tokens: int = 0
    kv_queue_timeout_s: float = 30.0
    # Streaming: least time between responses after the first (which goes as soon as its token is
    # chosen); the tokens chosen meanwhile go together. Below a model's time per token every token
    # goes on its own; above it, fewer responses (each is a round trip). 0: every token at once.
    stream_interval_ms: int = 50


@dataclass(frozen=True)
class ExportSpec:
    opset: int = 20
    parity_samples: int = 2  # fresh random inputs per component compared with PyTorch
    atol: float = 1e-4  # FP32 graphs: every output allclose to PyTorch's
    rtol: float = 1e-3
    fp16_min_cosine: float = 0.999  # FP16 graphs (precision fp16): every output's cosine with PyTorch's in FP16


@dataclass(frozen=True)
class OnnxRuntimeSpec:
    """target onnxruntime."""

    tensorrt_accelerator: bool = False  # run the encoders through ORT's TensorRT execution provider on a GPU


@dataclass(frozen=True)
class TensorRTSpec:
    """target tensorrt. Each engine is compared with ONNX Runtime FP32 under the quantize stage's gate."""

    comparison_samples: int = 2  # random inputs per optimization profile


@dataclass(frozen=True)
class CalibrationSpec:
    """Inputs of INT8 calibration and of the accuracy gate; they go through the server's own preprocessing.

    Paths are relative to the spec file; unset means the set shipped in ``data/calibration/``. Files
    are taken in name order: the first ``samples`` calibrate, the next ``holdout`` are the gate's.
    """

    images: str | None = None  # directory of PNG/JPEG files, any sizes
    audio: str | None = None  # directory of WAV files, any rates
    prompts: str | None = None  # text file, one prompt per line (the LLM gate's prompts)
    samples: int = 8
    holdout: int = 4


@dataclass(frozen=True)
class GateSpec:
    """A quantized graph is used only if every output meets these against FP32 on held-out inputs."""

    min_cosine: float = 0.99
    max_abs_error: float | None = None  # unset: reported, not gated
    max_mean_abs_error: float | None = None


@dataclass(frozen=True)
class LlmGateSpec(GateSpec):
    min_cosine: float = 0.98


@dataclass(frozen=True)
class PipelineGateSpec:
    """The whole quantized pipeline (encoders + LLM) against the FP32 one (a quantized LLM's: the checkpoint in
    PyTorch), teacher-forced over 32 positions of a fixed continuation of held-out requests of every kind the model
    takes; each kind must meet these."""

    min_agreement: float = 0.90  # share of positions where both pick the same next token; 0: reported, not gated
    min_cosine: float | None = None  # of the logits, worst position; unset: reported, not gated


@dataclass(frozen=True)
class QuantizeSpec:
    method: Literal["minmax", "entropy", "percentile"] = "minmax"  # the first calibration method tried
    fallback: bool = True  # a failed gate walks the fallback ladder; false: the build fails
    exclude_nodes: int = 4  # ladder rung: this many most sensitive nodes are kept in float
    llm_block_size: int = 32  # weight-only INT8 LLM: weights per scale
    gate: GateSpec = field(default_factory=GateSpec)  # encoders (INT8 and FP16)
    llm_gate: LlmGateSpec = field(default_factory=LlmGateSpec)
    pipeline_gate: PipelineGateSpec = field(default_factory=PipelineGateSpec)  # after the per-component gates


@dataclass(frozen=True)
class BuildSpec:
    name: str = "tiny"
    target: str = "python"  # a name in builder.targets.TARGETS (checked there: builder.targets.target_for)
    source: SourceSpec = field(default_factory=SourceSpec)
    components: ComponentsSpec = field(default_factory=ComponentsSpec)
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    triton: TritonSpec = field(default_factory=TritonSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    quantize: QuantizeSpec = field(default_factory=QuantizeSpec)
    onnxruntime: OnnxRuntimeSpec = field(default_factory=OnnxRuntimeSpec)  # a target's own section: its name
    tensorrt: TensorRTSpec = field(default_factory=TensorRTSpec)
    path: Path | None = field(default=None, compare=False)  # the file it was loaded from

    def section(self, name: str) -> dict[str, Any]:
        """A section as plain data, for cache keys and the manifest."""
        return dataclasses.asdict(getattr(self, name))


def load_spec(path: str | Path | None, overrides: dict[str, Any] | None = None) -> BuildSpec:
    """Reads and validates a spec file (None: no file, every key at its default); ``overrides`` are dotted keys
    (``target``, ``components.llm.precision``)."""
    path = Path(path) if path is not None else None
    if path is not None and not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        raw = (yaml.safe_load(path.read_text()) if path is not None else None) or {}
    except yaml.YAMLError as exc:  # one line: where, and what the parser expected
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the top level must be a mapping of keys")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    raw.pop("path", None)
    spec = _build(BuildSpec, raw, "")
    spec = dataclasses.replace(spec, path=path)
    _check(spec)
    return spec


def parse_spec(data: dict[str, Any]) -> BuildSpec:
    spec = _build(BuildSpec, data, "")
    _check(spec)
    return spec


def with_limits(spec: BuildSpec, limits: LimitsSpec) -> BuildSpec:
    """``spec`` with ``limits`` (e.g. derived from the checkpoint), checked by the same rules as a spec file's."""
    spec = dataclasses.replace(spec, limits=limits)
    _check(spec)
    return spec


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise SpecError(f"{prefix.rstrip('.') or 'spec'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.name != "path"}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(fields))})"
            raise SpecError(f"{prefix}{key}: unknown key{hint}")
        kwargs[key] = _value(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _value(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _value(option, value, key)
            except SpecError as exc:
                errors.append(str(exc))
        raise SpecError(errors[0])
    if origin is Literal:
        if value not in args:
            raise SpecError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{key}: expected a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise SpecError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"spec field {key} has an unsupported type {hint}")  # a bug in this file, not user input


def _check(spec: BuildSpec) -> None:
    """Rules that span keys."""
    if not _NAME.match(spec.name):
        raise SpecError(f"name: {spec.name!r} must be 1-64 letters, digits, '_', '-' or '.'")
    if (spec.source.preset is None) == (spec.source.checkpoint is None):
        raise SpecError("source: give exactly one of 'preset' or 'checkpoint'")
    lim = spec.limits
    positive = {k: v for k, v in dataclasses.asdict(lim).items() if v is not None and v <= 0}
    for key in positive:
        raise SpecError(f"limits.{key}: must be greater than 0")
    if lim.max_prompt_tokens is not None and lim.max_context is not None and lim.max_prompt_tokens >= lim.max_context:
        raise SpecError(
            f"limits.max_prompt_tokens ({lim.max_prompt_tokens}) must be smaller than limits.max_context ({lim.max_context})"
        )
    if lim.max_tokens is not None and lim.default_max_tokens > lim.max_tokens:
        raise SpecError(f"limits.default_max_tokens ({lim.default_max_tokens}) exceeds limits.max_tokens ({lim.max_tokens})")
    if not spec.components.llm.enabled:
        raise SpecError("components.llm.enabled: the language model cannot be disabled")
    for name in ("vision", "audio"):
        if getattr(spec.components, name).precision == "int4":
            raise SpecError(f"components.{name}.precision: int4 is for the llm's weights; an encoder takes int8, fp16 or fp32")
    for key in ("instances", "max_batch_size"):
        if getattr(spec.triton, key) < 1:
            raise SpecError(f"triton.{key}: must be at least 1")
    if spec.triton.stream_interval_ms < 0:
        raise SpecError("triton.stream_interval_ms: must be 0 (every token at once) or more")
    if spec.triton.prefix_cache_mb < 0:
        raise SpecError("triton.prefix_cache_mb: must be 0 (off) or more")
    if spec.triton.kv_budget_tokens < 0 or not spec.triton.kv_queue_timeout_s > 0:
        raise SpecError("triton.kv_budget_tokens: must be 0 (automatic) or more; triton.kv_queue_timeout_s: more than 0")
    if lim.max_context is not None and 0 < spec.triton.kv_budget_tokens < lim.max_context:
        raise SpecError(f"triton.kv_budget_tokens ({spec.triton.kv_budget_tokens}) must hold at least one request of "
                        f"limits.max_context ({lim.max_context})")
    if spec.export.parity_samples < 1:
        raise SpecError("export.parity_samples: must be at least 1")
    if spec.tensorrt.comparison_samples < 1:
        raise SpecError("tensorrt.comparison_samples: must be at least 1")
    cal = spec.calibration
    if cal.samples < 1 or cal.holdout < 1:
        raise SpecError("calibration.samples and calibration.holdout: must be at least 1")
    for key in ("gate", "llm_gate"):
        gate = getattr(spec.quantize, key)
        if not 0 < gate.min_cosine <= 1:
            raise SpecError(f"quantize.{key}.min_cosine: {gate.min_cosine} must be in (0, 1]")
        for bound in ("max_abs_error", "max_mean_abs_error"):
            if getattr(gate, bound) is not None and getattr(gate, bound) <= 0:
                raise SpecError(f"quantize.{key}.{bound}: must be greater than 0")
    pipeline = spec.quantize.pipeline_gate
    if not 0 <= pipeline.min_agreement <= 1 or (pipeline.min_cosine is not None and not 0 < pipeline.min_cosine <= 1):
        raise SpecError("quantize.pipeline_gate: min_agreement must be in [0, 1] and min_cosine in (0, 1]")
    if spec.quantize.exclude_nodes < 1 or spec.quantize.llm_block_size < 16:
        raise SpecError("quantize.exclude_nodes must be at least 1 and quantize.llm_block_size at least 16")
