"""A request's text, images and audio to the tensors the encoders and the LLM take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from builder.runtime.audio import (
    SAMPLE_RATE, AudioLimits, audio_to_clips, clip_count, decode_wav, mel_filter_bank, resample,
)
from builder.runtime.errors import RequestError
from builder.runtime.image import ImageLimits, decode_image, image_to_pixels
from builder.runtime.model_facts import ModelFacts
from builder.runtime.text import encode_text

if TYPE_CHECKING:  # the spec is build-side; serving renders its limits into config parameters
    from builder.spec import LimitsSpec


@dataclass(frozen=True)
class RequestLimits:
    max_images: int
    image: ImageLimits
    audio: AudioLimits
    max_prompt_tokens: int
    vision_enabled: bool = True
    audio_enabled: bool = True

    @classmethod
    def from_spec(cls, limits: "LimitsSpec", audio_enabled: bool = True) -> "RequestLimits":
        """The limits the build renders into the ``preprocess`` model, for preprocessing in-process."""
        return cls(
            max_images=limits.max_images, image=ImageLimits(limits.max_image_bytes, limits.max_image_pixels),
            audio=AudioLimits(limits.max_audio_bytes, limits.max_audio_clips),
            max_prompt_tokens=limits.max_prompt_tokens, audio_enabled=audio_enabled,
        )


@dataclass(frozen=True)
class ModelInputs:
    input_ids: np.ndarray  # [S] int64
    pixel_values: np.ndarray  # [images, 3, size, size] float32 (0 images is fine)
    input_features: np.ndarray  # [clips, mels, frames] float32


class Preprocessor:
    def __init__(self, facts: ModelFacts, tokenizer: Tokenizer, limits: RequestLimits) -> None:
        self.facts = facts
        # "[IMG]" or "</s>" typed by a user is text: control tokens come from the prompt layout only.
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.limits = limits
        self.mel_filters = mel_filter_bank(facts.num_mel_bins) if facts.num_mel_bins else None
        # No prompt longer than this fits in max_prompt_tokens: longer ones are refused without tokenizing
        # them (a 10 MB prompt takes the tokenizer 15 s). UTF-8 bytes of a token's string bound the bytes it covers.
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        longest = max(len(token.encode()) for token in tokenizer.get_vocab() if token not in special)
        self.max_prompt_bytes = limits.max_prompt_tokens * max(longest, 4)  # 4: an unknown character is one token

    def __call__(self, text: bytes | str | None, images: list[bytes], audio: list[bytes]) -> ModelInputs:
        facts, limits = self.facts, self.limits
        if text is None:
            raise RequestError("text_input: required input is missing")
        size = len(text) if isinstance(text, bytes) else len(text.encode())
        if size > self.max_prompt_bytes:
            raise RequestError(
                f"text_input: the prompt is {size} bytes, more than the limit of {limits.max_prompt_tokens} tokens "
                f"can hold ({self.max_prompt_bytes} bytes)"
            )
        try:
            prompt = text.decode("utf-8") if isinstance(text, bytes) else text
        except UnicodeDecodeError as exc:
            raise RequestError(f"text_input: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not prompt.strip():
            raise RequestError("text_input: the prompt is empty")
        if images and not limits.vision_enabled:
            raise RequestError("image: this model was built without a vision encoder")
        if audio and not limits.audio_enabled:
            raise RequestError("audio: this model was built without an audio encoder")
        if len(images) > limits.max_images:
            raise RequestError(f"image: {len(images)} images exceed the limit of {limits.max_images} per request")

        decoded = [decode_wav(data, i, limits.audio) for i, data in enumerate(audio)]
        # Counts and lengths first: image decoding, resampling and mel features cost time per pixel or sample.
        clip_counts = [clip_count(len(s), rate, facts.clip_samples, i, limits.audio) for i, (s, rate) in enumerate(decoded)]
        if sum(clip_counts) > limits.audio.max_clips:
            seconds = sum(len(s) / rate for s, rate in decoded)
            raise RequestError(
                f"audio: {seconds:.1f} s of audio in {len(audio)} files ({sum(clip_counts)} clips) exceeds the limit of "
                f"{limits.audio.max_clips * facts.clip_samples / SAMPLE_RATE:g} s ({limits.audio.max_clips} clips) per request"
            )
        ids = facts.layout.prompt_ids(encode_text(self.tokenizer, prompt), len(images), clip_counts)
        if len(ids) > limits.max_prompt_tokens:
            raise RequestError(
                f"text_input: the prompt is {len(ids)} tokens (images and audio included), "
                f"over the limit of {limits.max_prompt_tokens}"
            )

        size = facts.image_size
        pixels = np.zeros((len(images), 3, size, size), dtype=np.float32)
        for i, data in enumerate(images):
            pixels[i] = image_to_pixels(decode_image(data, i, limits.image), size, facts.image_mean, facts.image_std)
        assert self.mel_filters is not None or not decoded
        clips = [
            audio_to_clips(resample(samples, rate), self.mel_filters, facts.clip_samples, i, limits.audio)
            for i, (samples, rate) in enumerate(decoded)
        ]
        frames = facts.clip_samples // 160
        features = np.concatenate(clips) if clips else np.zeros((0, max(facts.num_mel_bins, 1), max(frames, 1)), np.float32)
        return ModelInputs(np.asarray(ids, dtype=np.int64), pixels, features.astype(np.float32))


def fuse_embeddings(
    input_ids: np.ndarray, image_embeds: np.ndarray, audio_embeds: np.ndarray, facts: ModelFacts
) -> tuple[np.ndarray, np.ndarray]:
    """Places image/audio embeddings at their placeholder tokens, in order: the source model's masked_scatter."""
    embeds = np.zeros((input_ids.size, facts.hidden_size), dtype=np.float32)
    mask = np.zeros(input_ids.size, dtype=bool)
    for token, features, what in ((facts.tokens.image, image_embeds, "image"), (facts.tokens.audio, audio_embeds, "audio")):
        positions = input_ids == token
        flat = features.reshape(-1, facts.hidden_size)
        if int(positions.sum()) != flat.shape[0]:
            raise RequestError(f"fuse: {int(positions.sum())} {what} placeholder tokens but {flat.shape[0]} {what} embeddings")
        embeds[positions] = flat
        mask |= positions
    return embeds, mask
