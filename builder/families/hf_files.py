"""What every family reads the same way from a Hugging Face checkpoint directory: JSON files, the tokenizer's
added tokens, the stop ids ``generate`` uses, and the weights through a transformers class, checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.errors import BuildError
from builder.runtime.audio import HOP, N_FFT, SAMPLE_RATE
from builder.runtime.model_facts import AudioFacts

if TYPE_CHECKING:
    import torch


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file, or {} when it is absent; malformed JSON is the user's to fix."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise BuildError(f"{path}: not valid JSON ({exc})") from None


def added_tokens(tokenizer: Path) -> dict[str, int]:
    """The special tokens of a ``tokenizer.json`` by their text."""
    return {t["content"]: int(t["id"]) for t in read_json(tokenizer).get("added_tokens", [])}


def token_id(added: dict[str, int], name: str, tokenizer: Path) -> int:
    if name not in added:
        raise BuildError(f"{tokenizer}: special token {name} is missing")
    return added[name]


def stop_ids(directory: Path, config: Any) -> tuple[int, ...]:
    """What ``generate`` stops at: generation_config.json's eos_token_id, else the config's."""
    eos = read_json(directory / "generation_config.json").get("eos_token_id")
    text = getattr(config, "text_config", None)
    if eos is None and text is not None:
        eos = text.eos_token_id
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        raise BuildError(f"{directory}: no eos_token_id in generation_config.json or config.json")
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


def load_pretrained(model_class: Any, directory: Path, config: Any, dtype: str,
                    may_be_missing: tuple[str, ...] = (), layers_on_demand: bool = False) -> "torch.nn.Module":
    """``model_class.from_pretrained`` in ``dtype`` (safetensors only, no remote code), in eval mode; a weight the
    config wants but the checkpoint lacks (unless its name starts with one of ``may_be_missing``), or one of
    another shape, is a ``BuildError`` where transformers would only warn. ``layers_on_demand``: the text decoder's
    layers are read from the shards only while each runs (:func:`builder.families.shards.load_layers_on_demand`)."""
    import torch
    from transformers.utils import logging as hf_logging

    if layers_on_demand:
        from builder.families.shards import load_layers_on_demand

        return load_layers_on_demand(model_class, directory, config, dtype, may_be_missing)

    # transformers logs unexpected keys as warnings; missing and mismatched ones are checked here.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = model_class.from_pretrained(
            directory, config=config, use_safetensors=True, trust_remote_code=False,
            output_loading_info=True, dtype=getattr(torch, dtype),
        )
    except (RuntimeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BuildError(f"{directory}: weights do not match config.json: {first}") from None
    mismatched = info.get("mismatched_keys") or []
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(may_be_missing)]
    if missing or mismatched:
        names = ", ".join(list(missing)[:3] + [str(m[0]) if isinstance(m, tuple) else str(m) for m in mismatched][:3])
        raise BuildError(f"{directory}: weights do not match config.json ({len(missing)} missing, "
                         f"{len(mismatched)} mismatched: {names})")
    return model.eval()


def check_feature_extractor(directory: Path, audio: AudioFacts) -> None:
    """The checkpoint's WhisperFeatureExtractor settings (``preprocessor_config.json``, or the copy transformers 5
    nests in ``processor_config.json``) must be the ones serving computes for its audio tower."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        found = read_json(directory / name)
        found = found.get("feature_extractor", found)
        expected = {"feature_size": audio.num_mel_bins, "hop_length": HOP, "n_fft": N_FFT, "sampling_rate": SAMPLE_RATE,
                    "n_samples": audio.clip_samples}
        for key, value in expected.items():
            if key in found and int(found[key]) != value:
                raise BuildError(f"{directory / name}: {key} is {found[key]}, the audio tower needs {value}")
