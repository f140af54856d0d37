"""Mistral-3 (Mistral Small 3.x, Magistral): Pixtral vision tower + patch merger + Mistral decoder.

Optionally with a Voxtral audio tower and projector described by ``audio_config`` and stored under
``audio_tower.`` / ``audio_projector.`` (the tiny preset's tri-modal convention; published Mistral-3
checkpoints have no audio). Image parameters come from the checkpoint's processor files, else (Mistral's
own layout) from ``tekken.json`` / ``params.json``, else from its vision config.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.errors import BuildError
from builder.families.base import Family, SourceModel, model_facts
from builder.families.hf_files import added_tokens, load_pretrained, read_json, token_id
from builder.families.mistral_files import MISTRAL_INSTRUCT_TEMPLATE, image_params_from_mistral_files
from builder.families.voxtral import audio_embeddings, voxtral_audio_facts
from builder.runtime.model_facts import ImageFacts, ModelFacts
from builder.runtime.preprocess import ModelInputs

if TYPE_CHECKING:
    import torch


_AUDIO_PREFIXES = ("audio_tower.", "audio_projector.")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Pixtral's defaults when a checkpoint has no processor file
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _side(value: Any) -> int:
    """Processor sizes are an int or {"height": h, "width": w} (square here)."""
    return int(value["height"] if isinstance(value, dict) else value)


def _processor_files(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``processor_config.json`` and ``preprocessor_config.json``; for a checkpoint in Mistral's own layout, which
    has neither (Mistral Small 3.2, Magistral), the same keys from ``tekken.json`` / ``params.json``, as
    transformers' ``convert_tekken_image_processor`` would write them. Empty when no file says: the vision config.
    """
    processor = read_json(directory / "processor_config.json")
    pre = read_json(directory / "preprocessor_config.json")
    mistral = image_params_from_mistral_files(directory) if not (processor or pre) else None
    if mistral is None:
        return processor, pre
    pre = {"size": {"longest_edge": mistral.longest_edge}}
    pre.update({key: list(value) for key, value in (("image_mean", mistral.image_mean), ("image_std", mistral.image_std))
                if value is not None})
    return {"patch_size": mistral.patch_size, "spatial_merge_size": mistral.spatial_merge_size}, pre


class Mistral3(Family):
    MODEL_TYPE = "mistral3"
    DEFAULT_CHAT_TEMPLATE = MISTRAL_INSTRUCT_TEMPLATE

    def read_facts(self, directory: Path, tokenizer: Path) -> ModelFacts:
        from transformers import Mistral3Config

        config = Mistral3Config.from_pretrained(directory)
        added = added_tokens(tokenizer)
        processor, pre = _processor_files(directory)

        def token(name: str) -> int:
            return token_id(added, name, tokenizer)

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
            audio = voxtral_audio_facts(config.audio_config, token("[AUDIO]"), token("[BEGIN_AUDIO]"))
        return model_facts(self.MODEL_TYPE, directory, config, image, audio)

    def load(self, directory: Path, dtype: str, tokenizer: Path, layers_on_demand: bool = False) -> SourceModel:
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        config = Mistral3Config.from_pretrained(directory)
        model = load_pretrained(Mistral3ForConditionalGeneration, directory, config, dtype, may_be_missing=_AUDIO_PREFIXES, layers_on_demand=layers_on_demand)
        parts: dict[str, torch.nn.Module] = {}
        if getattr(config, "audio_config", None):
            tower, projector = build_audio_modules(config)
            weight_files = sorted(directory.glob("*.safetensors"))
            _load_prefixed(weight_files, "audio_tower.", tower)
            _load_prefixed(weight_files, "audio_projector.", projector)
            parts = {"audio_tower": tower, "audio_projector": projector}
        return SourceModel(directory, model, self.read_facts(directory, tokenizer), parts)

    def reference_generate(self, source: SourceModel, inputs: ModelInputs, max_new_tokens: int) -> list[int]:
        import torch

        model, facts = source.model, source.facts
        ids = torch.from_numpy(inputs.input_ids)[None]
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)
            if len(inputs.pixel_values):
                assert facts.image is not None
                image = model.model.get_image_features(
                    pixel_values=torch.from_numpy(inputs.pixel_values), image_sizes=torch.from_numpy(inputs.image_sizes),
                    return_dict=True,
                ).pooler_output
                embeds = embeds.masked_scatter((ids == facts.image.token)[..., None], torch.cat(list(image)))
            if len(inputs.input_features):
                assert facts.audio is not None
                audio = audio_embeddings(source.parts["audio_tower"], source.parts["audio_projector"],
                                         torch.from_numpy(inputs.input_features))
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
