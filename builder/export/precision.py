"""The dtype a component's graph is exported in, decided by the precision it is served at.

FP16 components export straight from the checkpoint in FP16, so a BF16 24B model never exists in
FP32 (96 GB) on the build server; FP32 components and INT8 ones (quantized from the FP32 graph)
export in FP32. Graph inputs and outputs other than the KV cache stay FP32 either way (the
wrappers cast at the edges), so Triton configs and the serving code do not change with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch loads only when something is exported: a no-op build never imports it
    import torch

ExportDtype = Literal["float32", "float16"]


def export_dtype(precision: str) -> ExportDtype:
    return "float16" if precision == "fp16" else "float32"


def cast_weights(module: "torch.nn.Module", dtype: ExportDtype) -> None:
    """Casts the weights (parameters and saved buffers) in place, as ``from_pretrained(dtype=...)`` loads
    them; buffers a module computes itself (RoPE's ``inv_freq``) keep the dtype the module chose."""
    import torch

    target = getattr(torch, dtype)
    saved = set(module.state_dict(keep_vars=True).keys())
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if name in saved and tensor.is_floating_point() and tensor.dtype != target:
            tensor.data = tensor.data.to(target)
