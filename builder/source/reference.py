"""The correctness oracle: the source model in PyTorch, through its family's own composition.

Used by the end-to-end tests and as the "Hugging Face eager" benchmark baseline; the inputs are
what the server's ``preprocess`` makes, so both sides see the same token ids and pixels.
"""

from __future__ import annotations

from builder.families import FAMILIES
from builder.families.base import SourceModel
from builder.runtime.preprocess import ModelInputs


def reference_generate(source: SourceModel, inputs: ModelInputs, max_new_tokens: int = 16) -> list[int]:
    """Greedy new tokens from the model's own ``generate``."""
    return FAMILIES[source.facts.family].reference_generate(source, inputs, max_new_tokens)
