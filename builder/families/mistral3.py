"""Mistral-3 (Mistral Small 3.x, Magistral): Pixtral vision tower + patch merger + Mistral decoder.

Optionally with a Voxtral audio tower and projector described by ``audio_config`` and stored under
``audio_tower.`` / ``audio_projector.`` (the tiny preset's tri-modal convention; published Mistral-3
checkpoints have no audio). Image parameters come from the checkpoint's processor files, else (Mistral's
own layout) from ``tekken.json`` / ``params.json``, else from its vision config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from builder.errors import BuildError
from builder.families.base import Family, SourceModel
from builder.families.mistral_files import image_params_from_mistral_files
from builder.runtime.audio import HOP
from builder.runtime.model_facts import AudioFacts, ImageFacts, ModelFacts

if TYPE_CHECKING:
    import torch

    from builder.export.recipes import ExportRecipe
    from builder.spec import LimitsSpec

_AUDIO_PREFIXES = ("audio_tower.", "audio_projector.")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Pixtral's defaults when a checkpoint has no processor file
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Mistral's instruct layout, for checkpoints without a template of their own: media first, then the text.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ message['content'] }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}[IMG]{% elif item['type'] == 'audio' %}[AUDIO]{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}[/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise BuildError(f"{path}: not valid JSON ({exc})") from None


def _side(value: Any) -> int:
    """Processor sizes are an int or {"height": h, "width": w} (square here)."""
    return int(value["height"] if isinstance(value, dict) else value)


def _added_tokens(tokenizer: Path) -> dict[str, int]:
    vocab = _json(tokenizer)
    return {t["content"]: int(t["id"]) for t in vocab.get("added_tokens", [])}


def _processor_files(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``processor_config.json`` and ``preprocessor_config.json``; for a checkpoint in Mistral's own layout, which
    has neither (Mistral Small 3.2, Magistral), the same keys from ``tekken.json`` / ``params.json``, as
    transformers' ``convert_tekken_image_processor`` would write them. Empty when no file says: the vision config.
    """
    processor = _json(directory / "processor_config.json")
    pre = _json(directory / "preprocessor_config.json")
    mistral = image_params_from_mistral_files(directory) if not (processor or pre) else None
    if mistral is None:
        return processor, pre
    pre = {"size": {"longest_edge": mistral.longest_edge}}
    pre.update({key: list(value) for key, value in (("image_mean", mistral.image_mean), ("image_std", mistral.image_std))
                if value is not None})
    return {"patch_size": mistral.patch_size, "spatial_merge_size": mistral.spatial_merge_size}, pre


def _stop_ids(directory: Path, config: Any) -> tuple[int, ...]:
    """What ``generate`` stops at: generation_config.json's eos_token_id, else the config's."""
    eos = _json(directory / "generation_config.json").get("eos_token_id")
    if eos is None:
        eos = config.text_config.eos_token_id if config.text_config.eos_token_id is not None else config.eos_token_id
    if eos is None:
        raise BuildError(f"{directory}: no eos_token_id in generation_config.json or config.json")
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


class Mistral3(Family):
    MODEL_TYPE = "mistral3"
    DEFAULT_CHAT_TEMPLATE = DEFAULT_CHAT_TEMPLATE

    def read_facts(self, directory: Path, tokenizer: Path) -> ModelFacts:
        from transformers import Mistral3Config

        config = Mistral3Config.from_pretrained(directory)
        added = _added_tokens(tokenizer)
        processor, pre = _processor_files(directory)

        def token(name: str) -> int:
            if name not in added:
                raise BuildError(f"{tokenizer}: special token {name} is missing")
            return added[name]

        vision = config.vision_config
        image_text = processor.get("image_token", "[IMG]")
        image = ImageFacts(
            token=token(image_text),
            row_break=token(processor.get("image_break_token", "[IMG_BREAK]")),
            end=token(processor.get("image_end_token", "[IMG_END]")),
            patch_size=_side(processor.get("patch_size", vision.patch_size)),
            merge_size=int(processor.get("spatial_merge_size", config.spatial_merge_size)),
            longest_edge=int((pre.get("size") or {}).get("longest_edge", vision.image_size)),
            mean=tuple(pre.get("image_mean", CLIP_MEAN)),
            std=tuple(pre.get("image_std", CLIP_STD)),
            token_text=image_text,
        )
        if image.token != config.image_token_index:
            raise BuildError(f"{directory}: {image_text} is token {image.token} in {tokenizer} but "
                             f"{config.image_token_index} in config.json")
        if image.patch_size != vision.patch_size:
            raise BuildError(f"{directory}: processor patch_size {image.patch_size} differs from the vision "
                             f"tower's {vision.patch_size}")
        if image.merge_size != config.spatial_merge_size:
            raise BuildError(f"{directory}: processor spatial_merge_size {image.merge_size} differs from "
                             f"config.json's {config.spatial_merge_size}")
        audio = None
        if getattr(config, "audio_config", None):
            audio_config = config.audio_config
            positions = int(audio_config["max_source_positions"])
            audio = AudioFacts(
                token=token("[AUDIO]"), begin=token("[BEGIN_AUDIO]"),
                num_mel_bins=int(audio_config["num_mel_bins"]),
                # Whisper-style: 2 mel frames per encoder position.
                clip_samples=2 * positions * HOP, hop_length=HOP,
                # Voxtral's projector stacks intermediate_size // hidden_size positions per token.
                tokens_per_clip=positions * int(audio_config["hidden_size"]) // int(audio_config["intermediate_size"]),
                token_text="[AUDIO]",
            )
        text = config.text_config
        return ModelFacts(
            family=self.MODEL_TYPE,
            vocab_size=int(text.vocab_size),
            hidden_size=int(text.hidden_size),
            num_layers=int(text.num_hidden_layers),
            num_kv_heads=int(text.num_key_value_heads),
            head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads),
            stop_ids=_stop_ids(directory, config),
            image=image,
            audio=audio,
        )

    def load(self, directory: Path, dtype: str, tokenizer: Path) -> SourceModel:
        import torch
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration
        from transformers.utils import logging as hf_logging

        config = Mistral3Config.from_pretrained(directory)
        # transformers logs unexpected keys (the preset's audio weights) as warnings; missing ones we check ourselves.
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            model, info = Mistral3ForConditionalGeneration.from_pretrained(
                directory, config=config, use_safetensors=True, trust_remote_code=False,
                output_loading_info=True, dtype=getattr(torch, dtype),
            )
        except (RuntimeError, ValueError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BuildError(f"{directory}: weights do not match config.json: {first}") from None
        mismatched = info.get("mismatched_keys") or []
        missing = [k for k in info.get("missing_keys", []) if not k.startswith(_AUDIO_PREFIXES)]
        if missing or mismatched:
            names = ", ".join(list(missing)[:3] + [str(m[0]) if isinstance(m, tuple) else str(m) for m in mismatched][:3])
            raise BuildError(f"{directory}: weights do not match config.json ({len(missing)} missing, "
                             f"{len(mismatched)} mismatched: {names})")
        parts: dict[str, torch.nn.Module] = {}
        if getattr(config, "audio_config", None):
            tower, projector = build_audio_modules(config)
            weight_files = sorted(directory.glob("*.safetensors"))
            _load_prefixed(weight_files, "audio_tower.", tower)
            _load_prefixed(weight_files, "audio_projector.", projector)
            parts = {"audio_tower": tower, "audio_projector": projector}
        return SourceModel(directory, model.eval(), self.read_facts(directory, tokenizer), parts)

    def recipes(self, source: SourceModel, limits: "LimitsSpec", components: list[str]) -> list["ExportRecipe"]:
        from builder.export.recipes import audio_recipe, llm_recipe, vision_recipe

        makers = {"vision_encoder": vision_recipe, "audio_encoder": audio_recipe, "llm": llm_recipe}
        return [makers[name](source, limits) for name in components]

    def reference_generate(
        self, source: SourceModel, input_ids: np.ndarray, pixel_values: np.ndarray | None, image_sizes: np.ndarray | None,
        input_features: np.ndarray | None, max_new_tokens: int,
    ) -> list[int]:
        import torch

        model, facts = source.model, source.facts
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))[None]
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)
            if pixel_values is not None and len(pixel_values):
                assert facts.image is not None and image_sizes is not None
                image = model.model.get_image_features(
                    pixel_values=torch.from_numpy(pixel_values), image_sizes=torch.from_numpy(image_sizes), return_dict=True,
                ).pooler_output
                embeds = embeds.masked_scatter((ids == facts.image.token)[..., None], torch.cat(list(image)))
            if input_features is not None and len(input_features):
                assert facts.audio is not None
                audio = audio_embeddings(source.parts["audio_tower"], source.parts["audio_projector"],
                                         torch.from_numpy(input_features))
                embeds = embeds.masked_scatter((ids == facts.audio.token)[..., None], audio)
            out = model.generate(
                inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(facts.stop_ids),
                pad_token_id=facts.stop_ids[0],
            )
        return out[0].tolist()


def voxtral_config(config: Any) -> Any:
    from transformers import VoxtralConfig

    return VoxtralConfig(
        audio_config=dict(config.audio_config), text_config=config.text_config.to_dict(),
        audio_token_id=config.audio_token_id, projector_hidden_act=config.projector_hidden_act,
    )


def build_audio_modules(config: Any) -> tuple["torch.nn.Module", "torch.nn.Module"]:
    """Voxtral's audio tower and projector for a config with an ``audio_config``."""
    from transformers.models.voxtral.modeling_voxtral import VoxtralEncoder, VoxtralMultiModalProjector

    vconfig = voxtral_config(config)
    return VoxtralEncoder(vconfig.audio_config).eval(), VoxtralMultiModalProjector(vconfig).eval()


def audio_embeddings(tower: "torch.nn.Module", projector: "torch.nn.Module", input_features: "torch.Tensor") -> "torch.Tensor":
    """[clips, mels, frames] -> [clips * tokens_per_clip, hidden]: what ``VoxtralModel.get_audio_features`` does."""
    hidden = tower(input_features, return_dict=True).last_hidden_state
    hidden = hidden.reshape(-1, tower.config.intermediate_size)
    return projector(hidden)


def _load_prefixed(weight_files: list[Path], prefix: str, module: "torch.nn.Module") -> None:
    from safetensors import safe_open

    state = {}
    for path in weight_files:
        with safe_open(str(path), framework="pt") as handle:
            state.update({k[len(prefix):]: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)})
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BuildError(f"{prefix.rstrip('.')} weights do not match audio_config: {str(exc).splitlines()[0]}") from None
    module.eval()


FAMILY = Mistral3()
