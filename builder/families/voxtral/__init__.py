"""Voxtral (Voxtral Mini / Small): Whisper-style audio encoder + projector + Llama decoder, text and audio in.

As Mistral publishes it: ``config.json`` (``VoxtralConfig``), weights in safetensors shards, ``tekken.json`` as the
only tokenizer and no chat template: the prompt is mistral-common's instruct encoding (what ``VoxtralProcessor``
runs), reproduced by :data:`VOXTRAL_CHAT_TEMPLATE`. Audio is resampled to 16 kHz, padded to whole 30 s windows,
turned into one log-mel over the whole signal and cut into windows of ``2 x max_source_positions`` frames; each
audio input becomes ``[BEGIN_AUDIO]`` and ``[AUDIO]`` x (tokens per window x windows).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.errors import BuildError
from builder.families.base import Family, SourceModel, greedy_new_tokens, model_facts
from builder.families.hf_files import added_tokens, check_feature_extractor, load_pretrained, read_json, token_id
from builder.families.mistral_files import MISTRAL_INSTRUCT_TEMPLATE
from builder.runtime.audio import HOP, SAMPLE_RATE
from builder.runtime.model_facts import AudioFacts, ModelFacts
from builder.runtime.preprocess import ModelInputs

if TYPE_CHECKING:
    import torch


# mistral-common (tokenizers before v13, Voxtral Mini and Small's v7) refuses a system message beside audio; so do we.
VOXTRAL_CHAT_TEMPLATE = MISTRAL_INSTRUCT_TEMPLATE.replace(
    "{% elif item['type'] == 'audio' %}[AUDIO]",
    "{% elif item['type'] == 'audio' %}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('a system prompt cannot go with audio in this model\\'s prompt format "
    "(mistral-common tokenizers before v13); send one or the other') }}{% endif %}[AUDIO]",
)


def voxtral_audio_facts(audio_config: Any, token: int, begin: int) -> AudioFacts:
    """A Voxtral audio tower's windows and tokens: 2 mel frames per encoder position, and the projector stacks
    ``intermediate_size // hidden_size`` positions into one token (``get_audio_features``' reshape)."""
    get = audio_config.get if isinstance(audio_config, dict) else lambda key: getattr(audio_config, key)
    positions, hidden, intermediate = int(get("max_source_positions")), int(get("hidden_size")), int(get("intermediate_size"))
    if intermediate % hidden or positions % (intermediate // hidden):
        raise BuildError(f"audio_config: {positions} positions of width {hidden} do not stack into whole tokens of "
                         f"width intermediate_size={intermediate}")
    return AudioFacts(token=token, begin=begin, num_mel_bins=int(get("num_mel_bins")), clip_samples=2 * positions * HOP,
                      hop_length=HOP, positions_per_token=intermediate // hidden, layout="windows", token_text="[AUDIO]")


def audio_embeddings(tower: "torch.nn.Module", projector: "torch.nn.Module", input_features: "torch.Tensor") -> "torch.Tensor":
    """[clips, mels, frames] -> [clips * tokens_per_clip, hidden]: what ``VoxtralModel.get_audio_features`` does."""
    hidden = tower(input_features, return_dict=True).last_hidden_state
    hidden = hidden.reshape(-1, tower.config.intermediate_size)
    return projector(hidden)


def _check_processor(directory: Path, audio: AudioFacts) -> None:
    """The checkpoint's own audio settings (WhisperFeatureExtractor's file, tekken.json's audio section) must be the
    ones serving computes: a mismatch would feed the tower features or token counts it was not trained on."""
    check_feature_extractor(directory, audio)
    section = read_json(directory / "tekken.json").get("audio")
    if not section:
        return
    clip_seconds = audio.clip_samples / SAMPLE_RATE
    encoding = section.get("audio_encoding_config", {})
    found = {"sampling_rate": section.get("sampling_rate"), "num_mel_bins": encoding.get("num_mel_bins"),
             "hop_length": encoding.get("hop_length"), "chunk_length_s": section.get("chunk_length_s"),
             "tokens per chunk": float(section["frame_rate"]) * clip_seconds if "frame_rate" in section else None}
    wanted = {"sampling_rate": SAMPLE_RATE, "num_mel_bins": audio.num_mel_bins, "hop_length": HOP,
              "chunk_length_s": clip_seconds, "tokens per chunk": audio.tokens_per_clip}
    for key, value in found.items():
        if value is not None and float(value) != float(wanted[key]):
            raise BuildError(f"{directory / 'tekken.json'}: audio {key} is {value}, the audio tower needs {wanted[key]}")


class Voxtral(Family):
    MODEL_TYPE = "voxtral"
    DEFAULT_CHAT_TEMPLATE = VOXTRAL_CHAT_TEMPLATE  # mistral-common's instruct layout: [INST] audio..., text [/INST]

    def read_facts(self, directory: Path, tokenizer: Path) -> ModelFacts:
        from transformers import VoxtralConfig

        config = VoxtralConfig.from_pretrained(directory)
        added = added_tokens(tokenizer)
        audio = voxtral_audio_facts(config.audio_config, token_id(added, "[AUDIO]", tokenizer),
                                    token_id(added, "[BEGIN_AUDIO]", tokenizer))
        if audio.token != config.audio_token_id:
            raise BuildError(f"{directory}: [AUDIO] is token {audio.token} in {tokenizer} but "
                             f"{config.audio_token_id} in config.json")
        _check_processor(directory, audio)
        return model_facts(self.MODEL_TYPE, directory, config, None, audio)

    def load(self, directory: Path, dtype: str, tokenizer: Path, layers_on_demand: bool = False) -> SourceModel:
        from transformers import VoxtralConfig, VoxtralForConditionalGeneration

        config = VoxtralConfig.from_pretrained(directory)
        model = load_pretrained(VoxtralForConditionalGeneration, directory, config, dtype, layers_on_demand=layers_on_demand)
        parts = {"audio_tower": model.model.audio_tower, "audio_projector": model.model.multi_modal_projector}
        return SourceModel(directory, model, self.read_facts(directory, tokenizer), parts)

    def reference_generate(self, source: SourceModel, inputs: ModelInputs, max_new_tokens: int) -> list[int]:
        features = {"input_features": inputs.input_features} if len(inputs.input_features) else {}
        return greedy_new_tokens(source, inputs.input_ids, max_new_tokens, **features)


FAMILY = Voxtral()
