"""Qwen2-Audio (Qwen2-Audio-7B(-Instruct)): Whisper-style audio encoder + linear projector + Qwen2 decoder.

As Qwen publishes it: ``config.json`` (``Qwen2AudioConfig``), safetensors shards, ``tokenizer.json``, the chat
template (each audio as ``Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>``, a default system prompt) and a
``WhisperFeatureExtractor`` config. Each audio input is one 30 s window (the processor cuts longer audio; serving
refuses it instead) whose padding the encoder masks; ``<|AUDIO|>`` expands to as many tokens as the clip's own
frames give: ((frames - 1) // 2 + 1) // 2. The processor does not resample: HF's examples load audio at 16 kHz
with librosa, whose default resampler (soxr HQ) is the one serving uses.
"""

from __future__ import annotations

from pathlib import Path

from builder.errors import BuildError
from builder.families.base import Family, SourceModel, greedy_new_tokens, model_facts
from builder.families.hf_files import added_tokens, check_feature_extractor, load_pretrained, token_id
from builder.runtime.audio import HOP
from builder.runtime.model_facts import AudioFacts, ModelFacts
from builder.runtime.preprocess import ModelInputs

AUDIO_TOKEN = "<|AUDIO|>"

# Qwen2-Audio-7B-Instruct's template (transformers' Qwen2AudioProcessor.default_chat_template), for checkpoints
# without one of their own.
DEFAULT_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


class Qwen2Audio(Family):
    MODEL_TYPE = "qwen2_audio"
    DEFAULT_CHAT_TEMPLATE = DEFAULT_CHAT_TEMPLATE

    def read_facts(self, directory: Path, tokenizer: Path) -> ModelFacts:
        from transformers import Qwen2AudioConfig

        config = Qwen2AudioConfig.from_pretrained(directory)
        token = token_id(added_tokens(tokenizer), AUDIO_TOKEN, tokenizer)
        configured = getattr(config, "audio_token_id", None)
        configured = getattr(config, "audio_token_index", None) if configured is None else configured
        if token != configured:
            raise BuildError(f"{directory}: {AUDIO_TOKEN} is token {token} in {tokenizer} but {configured} in config.json")
        tower = config.audio_config
        # Whisper's encoder: 2 mel frames per position; Qwen2-Audio's average pooling: 2 positions per token.
        audio = AudioFacts(token=token, begin=None, num_mel_bins=int(tower.num_mel_bins),
                           clip_samples=2 * int(tower.max_source_positions) * HOP, hop_length=HOP, positions_per_token=2,
                           layout="masked", token_text=AUDIO_TOKEN)
        check_feature_extractor(directory, audio)
        return model_facts(self.MODEL_TYPE, directory, config, None, audio)

    def load(self, directory: Path, dtype: str, tokenizer: Path, layers_on_demand: bool = False) -> SourceModel:
        from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

        config = Qwen2AudioConfig.from_pretrained(directory)
        model = load_pretrained(Qwen2AudioForConditionalGeneration, directory, config, dtype, layers_on_demand=layers_on_demand)
        parts = {"audio_tower": model.model.audio_tower, "audio_projector": model.model.multi_modal_projector}
        return SourceModel(directory, model, self.read_facts(directory, tokenizer), parts)

    def reference_generate(self, source: SourceModel, inputs: ModelInputs, max_new_tokens: int) -> list[int]:
        from builder.runtime.audio import audio_feeds

        audio = audio_feeds(inputs.input_features, inputs.audio_frames) if len(inputs.input_features) else {}
        return greedy_new_tokens(source, inputs.input_ids, max_new_tokens, **audio)


FAMILY = Qwen2Audio()
