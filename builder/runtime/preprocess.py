"""A request's text, images and audio to the tensors the encoders and the LLM take.

The prompt is the checkpoint's own chat template rendered for one user turn (media first, then
the text), tokenized, with each media marker expanded to the model's placeholder tokens. Images
keep their aspect ratio (Pixtral's resize), so a batch of images is padded to the largest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from .audio import SAMPLE_RATE, AudioLimits, decode_wav, mel_filter_bank
from .chat import ChatPrompt, parse_conversation
from .errors import RequestError
from .image import ImageLimits, decode_image, image_to_pixels, pad_images
from .media import audio_layout, image_layout
from .model_facts import ModelFacts
from .prompt import expand_placeholders, mrope_positions
from .text import load_tokenizer

JSON_OVERHEAD = 4

if TYPE_CHECKING:  # the spec is build-side; serving renders its limits into config parameters
    from builder.spec import LimitsSpec


@dataclass(frozen=True)
class RequestLimits:
    max_images: int
    image: ImageLimits
    audio: AudioLimits
    max_prompt_tokens: int

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> "RequestLimits":
        """What ``from_spec`` gives, read back from the ``preprocess`` config's parameters."""
        return cls(
            max_images=int(parameters["max_images"]),
            image=ImageLimits(int(parameters["max_image_bytes"]), int(parameters["max_image_pixels"])),
            audio=AudioLimits(int(parameters["max_audio_bytes"]), int(parameters["max_audio_clips"])),
            max_prompt_tokens=int(parameters["max_prompt_tokens"]),
        )

    def parameters(self) -> dict[str, str]:
        """The limits as the build renders them into the ``preprocess`` config."""
        return {"max_images": str(self.max_images), "max_image_bytes": str(self.image.max_bytes),
                "max_image_pixels": str(self.image.max_pixels), "max_audio_clips": str(self.audio.max_clips),
                "max_audio_bytes": str(self.audio.max_bytes), "max_prompt_tokens": str(self.max_prompt_tokens)}

    @classmethod
    def from_spec(cls, limits: "LimitsSpec") -> "RequestLimits":
        """The limits the build renders into the ``preprocess`` model, for preprocessing in-process."""
        return cls(
            max_images=limits.max_images, image=ImageLimits(limits.max_image_bytes, limits.max_image_pixels),
            audio=AudioLimits(limits.max_audio_bytes, limits.max_audio_clips), max_prompt_tokens=limits.max_prompt_tokens,
        )


@dataclass(frozen=True)
class ModelInputs:
    input_ids: np.ndarray  # [S] int64
    pixel_values: np.ndarray  # [images, 3, Hmax, Wmax] float32, each image zero-padded bottom/right (0 images is fine)
    image_sizes: np.ndarray  # [images, 2] int64: each image's resized (height, width)
    input_features: np.ndarray  # [clips, mels, frames] float32
    audio_frames: np.ndarray  # [clips] int64: the mel frames each clip's encoder attends to (the rest is padding)
    position_ids: np.ndarray | None = None  # [3, S] int64 when the decoder takes M-RoPE positions (position_rows 3)


class Preprocessor:
    def __init__(self, facts: ModelFacts, tokenizer: Tokenizer, chat: ChatPrompt, limits: RequestLimits) -> None:
        self.facts = facts
        self.tokenizer = tokenizer
        self.chat = chat
        self.limits = limits
        self.image_layout = image_layout(facts.image) if facts.image else None
        self.audio_layout = audio_layout(facts.audio) if facts.audio else None
        self.mel_filters = mel_filter_bank(facts.audio.num_mel_bins) if facts.audio else None
        # No prompt longer than this fits in max_prompt_tokens: longer ones are refused without tokenizing
        # them (a 10 MB prompt takes the tokenizer 15 s). UTF-8 bytes of a token's string bound the bytes it covers.
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        longest = max(len(token.encode()) for token in tokenizer.get_vocab() if token not in special)
        self.max_prompt_bytes = limits.max_prompt_tokens * max(longest, 4)  # 4: an unknown character is one token

    @classmethod
    def from_directory(cls, directory: str | Path, limits: RequestLimits) -> "Preprocessor":
        """From the serving files the build writes side by side (facts, tokenizer, chat template)."""
        directory = Path(directory)
        return cls(ModelFacts.load(directory / "model_facts.json"), load_tokenizer(str(directory / "tokenizer.json")),
                   ChatPrompt.load(directory), limits)

    def __call__(
        self, text: bytes | str | None, images: list[bytes], audio: list[bytes], system_prompt: bytes | str | None = None,
        messages: bytes | str | None = None,
    ) -> ModelInputs:
        """One request: ``text`` (+ ``system_prompt``), or the conversation in ``messages``; the media it names."""
        facts, limits = self.facts, self.limits
        conversation = self._conversation(text, system_prompt, messages, len(images), len(audio))
        prompt_input = "messages" if messages is not None else "text_input"
        if images and facts.image is None:
            raise RequestError("image: this model has no vision encoder; send text or audio only")
        if audio and facts.audio is None:
            raise RequestError("audio: this model has no audio encoder; send text or images only")
        if len(images) > limits.max_images:
            raise RequestError(f"image: {len(images)} images exceed the limit of {limits.max_images} per request")

        decoded_audio = [decode_wav(data, i, limits.audio) for i, data in enumerate(audio)]
        # Counts and sizes first: resizing, resampling and mel features cost time per pixel or sample.
        frames = self._clip_frames(decoded_audio, len(audio))
        decoded_images = [decode_image(data, i, limits.image) for i, data in enumerate(images)]
        sizes = [self.image_layout.resized_size(img.height, img.width, i) for i, img in enumerate(decoded_images)]
        expansions = {facts.image.token_text: facts.image.expansion} if facts.image and facts.image.expansion else {}
        rendered = self.chat.encode(self.tokenizer, conversation, expansions)
        ids = expand_placeholders(rendered, facts, sizes, frames)
        if len(ids) > limits.max_prompt_tokens:
            raise RequestError(
                f"{prompt_input}: the prompt is {len(ids)} tokens (images and audio included), "
                f"over the limit of {limits.max_prompt_tokens}"
            )
        pixels, image_sizes = self._pixels(decoded_images, sizes)
        clip_frames = np.asarray([f for clips in frames for f in clips], dtype=np.int64)
        positions = mrope_positions(ids, facts.image, sizes) if facts.position_rows == 3 else None
        return ModelInputs(np.asarray(ids, dtype=np.int64), pixels, image_sizes,
                           self._features(decoded_audio, clip_frames), clip_frames, positions)

    def _conversation(self, text: bytes | str | None, system_prompt: bytes | str | None, messages: bytes | str | None,
                      images: int, audio: int) -> list[dict[str, Any]]:
        if messages is not None:
            if text is not None or system_prompt is not None:
                raise RequestError("messages: send the conversation alone, without text_input or system_prompt "
                                   "(its system turn goes first in it)")
            # JSON quotes, keys and escapes: allow the document several times the bytes its text may take
            document = self._text("messages", messages, JSON_OVERHEAD * self.max_prompt_bytes)
            return parse_conversation(document, images, audio, self.chat.system_as_blocks)
        prompt = self._text("text_input", text)
        if prompt is None:
            raise RequestError("text_input: required input is missing (or send the conversation in messages)")
        if not prompt.strip():
            raise RequestError("text_input: the prompt is empty")
        return self.chat.conversation(prompt, images, audio, self._text("system_prompt", system_prompt))

    def _text(self, name: str, value: bytes | str | None, max_bytes: int | None = None) -> str | None:
        if value is None:
            return None
        size = len(value) if isinstance(value, bytes) else len(value.encode())
        if size > (max_bytes or self.max_prompt_bytes):
            raise RequestError(
                f"{name}: {size} bytes is more than the limit of {self.limits.max_prompt_tokens} prompt tokens "
                f"can hold ({max_bytes or self.max_prompt_bytes} bytes)"
            )
        try:
            return value.decode("utf-8") if isinstance(value, bytes) else value
        except UnicodeDecodeError as exc:
            raise RequestError(f"{name}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

    def _clip_frames(self, decoded: list[tuple[np.ndarray, int]], files: int) -> list[list[int]]:
        """Per audio input, the mel frames of each of its encoder clips; the clips of all inputs within the limit."""
        if not decoded:
            return []
        audio, layout, limits = self.facts.audio, self.audio_layout, self.limits.audio
        assert audio is not None and layout is not None
        frames = [layout.clip_frames(len(s), rate, i, limits) for i, (s, rate) in enumerate(decoded)]
        clips = sum(map(len, frames))
        if clips > limits.max_clips:
            seconds = sum(len(s) / rate for s, rate in decoded)
            raise RequestError(
                f"audio: {seconds:.1f} s of audio in {files} files ({clips} clips) exceeds the limit of "
                f"{limits.max_clips * audio.clip_samples / SAMPLE_RATE:g} s ({limits.max_clips} clips) per request"
            )
        return frames

    def _pixels(self, decoded: list, sizes: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        image = self.facts.image
        if image is None or not decoded:
            return np.zeros((0, 3, 1, 1), np.float32), np.zeros((0, 2), np.int64)
        return pad_images([image_to_pixels(img, size, image.mean, image.std, image.resample)
                           for img, size in zip(decoded, sizes)])

    def _features(self, decoded: list[tuple[np.ndarray, int]], frames: np.ndarray) -> np.ndarray:
        layout = self.audio_layout
        if layout is None or not decoded:  # no clips: a width of 1 where clips keep their own frames
            mels, width = (layout.audio.num_mel_bins, layout.clip_width or 1) if layout else (1, 1)
            return np.zeros((0, mels, width), np.float32)
        assert self.mel_filters is not None
        return layout.features(decoded, frames, self.mel_filters, self.limits.audio)


def fuse_embeddings(
    input_ids: np.ndarray, image_embeds: np.ndarray, audio_embeds: np.ndarray, facts: ModelFacts
) -> tuple[np.ndarray, np.ndarray]:
    """Places image/audio embeddings at their placeholder tokens, in order: the source model's masked_scatter."""
    embeds = np.zeros((input_ids.size, facts.hidden_size), dtype=np.float32)
    mask = np.zeros(input_ids.size, dtype=bool)
    media = [(facts.image.token if facts.image else None, image_embeds, "image"),
             (facts.audio.token if facts.audio else None, audio_embeds, "audio")]
    for token, features, what in media:
        positions = input_ids == token if token is not None else np.zeros(input_ids.size, dtype=bool)
        flat = features.reshape(-1, facts.hidden_size)
        if int(positions.sum()) != flat.shape[0]:
            raise RequestError(f"fuse: {int(positions.sum())} {what} placeholder tokens but {flat.shape[0]} {what} embeddings")
        embeds[positions] = flat
        mask |= positions
    return embeds, mask
