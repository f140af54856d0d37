"""TensorRT optimization profiles from the spec's shape ranges, and the rules that keep them and the config consistent.

A graph's dynamic axes carry the names the export gave them (``images``, ``clips``, ``batch``,
``sequence``, ``past``, ``total``); a profile gives each name a (min, opt, max) range and so every
dynamic input a (min, opt, max) shape. The encoders get one profile whose batch axis spans
1..``triton.max_batch_size`` (Triton batches images/clips across requests up to the config's
``max_batch_size``). The LLM gets two: prefill (one prompt at a time, empty past) and decode (one
token for each of 1..``max_decode_batch`` sequences decoding together, past up to the context); the
``llm`` model's ``max_decode_batch`` is the spec's ``triton.max_batch_size`` too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx

from builder.components import COMPONENTS, LLM
from builder.errors import BuildError
from builder.export.axes import vision_axis_names
from builder.runtime.model_facts import ImageFacts
from builder.spec import BuildSpec

Shape = tuple[int, ...]


@dataclass(frozen=True)
class AxisRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise BuildError(f"profile range {self.min}/{self.opt}/{self.max}: need 0 <= min <= opt <= max")


@dataclass(frozen=True)
class InputShapes:
    min: Shape
    opt: Shape
    max: Shape


@dataclass(frozen=True)
class Profile:
    name: str  # what the profile is for: "all", "prefill", "decode"
    batch_axis: str  # the axis name Triton (or the decode model) batches on
    axes: Mapping[str, AxisRange]
    batch_limit: str = "max_batch_size"  # the config setting its batch range must reach; "" for one request at a time

    @property
    def max_batch(self) -> int:
        return self.axes[self.batch_axis].max

    def shapes(self, dims: Mapping[str, tuple[int | str, ...]]) -> dict[str, InputShapes]:
        """(min, opt, max) shape of every input; ``dims`` maps input -> fixed sizes and axis names."""
        return {name: InputShapes(*(self._resolve(name, axes, part) for part in ("min", "opt", "max")))
                for name, axes in dims.items()}

    def _resolve(self, name: str, axes: tuple[int | str, ...], part: str) -> Shape:
        shape = []
        for axis in axes:
            if isinstance(axis, int):
                shape.append(axis)
            elif axis in self.axes:
                shape.append(getattr(self.axes[axis], part))
            else:
                raise BuildError(f"input {name}: dynamic axis {axis!r} has no range in the {self.name} profile")
        return tuple(shape)


def profiles_for(component: str, spec: BuildSpec, image: ImageFacts | None = None) -> tuple[Profile, ...]:
    """``image``: the vision graph's height and width are dynamic too, one placeholder cell up to the longest edge."""
    lim, batch, encoder = spec.limits, spec.triton.max_batch_size, COMPONENTS[component]
    if encoder.batch_axis is not None and encoder.request_limit is not None:
        axis, per_request = encoder.batch_axis, getattr(lim, encoder.request_limit)
        axes = {axis: AxisRange(1, min(per_request, batch), batch)}
        if encoder.media == "image" and image is not None:
            largest = -(-image.longest_edge // image.cell) * image.cell
            side = AxisRange(image.cell, min(largest, 32 * image.cell), largest)  # opt: a typical photo's side
            axes |= dict.fromkeys(vision_axis_names(image.cell), side)
        return (Profile("all", axis, axes),)
    if component == LLM.name:
        one = AxisRange(1, 1, 1)
        prompt, context = lim.max_prompt_tokens, lim.max_context
        typical = min(128, prompt)
        return (
            Profile("prefill", "batch", {"batch": one, "sequence": AxisRange(1, typical, prompt),
                                         "past": AxisRange(0, 0, 0), "total": AxisRange(1, typical, prompt)},
                    batch_limit=""),
            # opt at the full batch: under load, where throughput matters, every decode step is full.
            Profile("decode", "batch", {"batch": AxisRange(1, batch, batch), "sequence": one,
                                        "past": AxisRange(1, context // 2, context - 1),
                                        "total": AxisRange(2, context // 2 + 1, context)},
                    batch_limit="max_decode_batch"),
        )
    raise BuildError(f"no optimization profile is defined for component {component!r}")


def input_axes(onnx_path: Path) -> dict[str, tuple[int | str, ...]]:
    """Each graph input's dims: fixed sizes as ints, dynamic axes by their name."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    axes: dict[str, tuple[int | str, ...]] = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") and not d.dim_param for d in dims):
            raise BuildError(f"{onnx_path}: input {value.name} has an unnamed dynamic axis; profiles need axis names")
        axes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims)
    return axes


def check_profiles(model: str, profiles: tuple[Profile, ...], max_batch: int) -> None:
    """Every profile must serve exactly the batch it will be sent: up to ``max_batch`` (the config's
    ``max_batch_size`` for an encoder, the ``llm`` model's ``max_decode_batch`` for the decode
    profile), or 1 for a profile fed one request at a time (the LLM's prefill)."""
    for profile in profiles:
        where = f"{model}: profile {profile.name!r} allows batch up to {profile.max_batch}"
        if not profile.batch_limit and profile.max_batch != 1:
            raise BuildError(f"{where} but it is fed one request at a time: it must be 1")
        if profile.batch_limit and profile.max_batch != max_batch:
            raise BuildError(f"{where} but the config's {profile.batch_limit} is {max_batch}: they must be equal")


def check_request_fits(model: str, profiles: tuple[Profile, ...], request: Mapping[str, int]) -> None:
    """``request`` maps axis name -> the largest size one request may need (spec limits); some
    profile must reach it, else requests at the limit fail inside the server."""
    for axis, size in request.items():
        reach = max((p.axes[axis].max for p in profiles if axis in p.axes), default=0)
        if size > reach:
            raise BuildError(f"{model}: a request may need {axis} = {size}, but the profiles reach only {reach}")


def request_ranges(component: str, spec: BuildSpec) -> dict[str, int]:
    lim, encoder = spec.limits, COMPONENTS[component]
    if encoder.batch_axis is not None and encoder.request_limit is not None:
        return {encoder.batch_axis: getattr(lim, encoder.request_limit)}
    return {"sequence": lim.max_prompt_tokens, "total": lim.max_context, "past": lim.max_context - 1}
