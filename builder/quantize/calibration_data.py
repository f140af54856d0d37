"""The spec's calibration files, split into calibration and held-out samples and preprocessed as the server does.

Images and WAV files go through :class:`builder.runtime.preprocess.Preprocessor`, the code the
``preprocess`` model runs, so calibration sees exactly the tensors the encoders see when serving.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from builder.errors import BuildError
from builder.runtime.chat import ChatPrompt
from builder.runtime.errors import RequestError
from builder.runtime.media import audio_layout, image_layout
from builder.runtime.model_facts import ModelFacts
from builder.runtime.preprocess import ModelInputs, Preprocessor, RequestLimits
from builder.runtime.text import load_tokenizer
from builder.spec import BuildSpec

# builder/calibration links to data/calibration/: shipped as package data in a wheel.
DEFAULT_DIRECTORY = Path(__file__).resolve().parents[1] / "calibration"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class CalibrationFiles:
    """The files in name order: the first ``samples`` calibrate, the next ``holdout`` are held out."""

    images: tuple[Path, ...]
    audio: tuple[Path, ...]
    prompts: tuple[str, ...]
    samples: int
    holdout: int

    @property
    def calibration_prompts(self) -> tuple[str, ...]:
        """The prompts calibration reads (the held-out ones after them never)."""
        return self.prompts[:self.samples]

    @property
    def digest(self) -> str:
        """Hash of every byte the stage reads, so the cache notices an edited or replaced file."""
        digest = hashlib.sha256(f"{self.samples}/{self.holdout}".encode())
        for path in (*self.images, *self.audio):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        digest.update("\n".join(self.prompts).encode())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Split:
    calibration: tuple[dict[str, np.ndarray], ...]  # one encoder batch per file, by graph input name
    holdout: tuple[dict[str, np.ndarray], ...]


@dataclass(frozen=True)
class CalibrationSamples:
    pixel_values: Split | None  # None: the model has no vision encoder
    input_features: Split | None  # None: the model has no audio encoder
    prompts: tuple[ModelInputs, ...]  # held-out requests: prompt + image, prompt + audio, taking turns (text alone without media)


def calibration_files(spec: BuildSpec, with_images: bool, with_audio: bool) -> CalibrationFiles:
    """The files of the media the build's encoders take (``with_images``/``with_audio``), and the prompts."""
    cal = spec.calibration
    base = spec.path.parent if spec.path is not None else Path.cwd()
    needed = cal.samples + cal.holdout

    def located(value: str | None, default: str, key: str) -> Path:
        path = (base / value) if value is not None else DEFAULT_DIRECTORY / default
        if not path.exists():
            raise BuildError(f"calibration.{key}: {path} does not exist")
        return path

    def listed(key: str, default: str, suffixes: tuple[str, ...]) -> tuple[Path, ...]:
        directory = located(getattr(cal, key), default, key)
        files = sorted(p for p in directory.iterdir() if p.suffix.lower() in suffixes)
        if len(files) < needed:
            raise BuildError(
                f"calibration.{key}: {directory} holds {len(files)} {'/'.join(suffixes)} files; "
                f"calibration.samples + calibration.holdout = {needed} are needed"
            )
        return tuple(files[:needed])

    prompts_file = located(cal.prompts, "prompts.txt", "prompts")
    prompts = tuple(line.strip() for line in prompts_file.read_text().splitlines() if line.strip())
    if len(prompts) < needed:
        raise BuildError(f"calibration.prompts: {prompts_file} has {len(prompts)} prompts; {needed} are needed")
    audio = listed("audio", "audio", (".wav",)) if with_audio else ()
    images = listed("images", "images", _IMAGE_SUFFIXES) if with_images else ()
    return CalibrationFiles(images, audio, prompts[:needed], cal.samples, cal.holdout)


def fixed_continuations(files: CalibrationFiles, tokenizer: Tokenizer, count: int, positions: int) -> tuple[np.ndarray, ...]:
    """What the gates feed after each of ``count`` held-out prompts (:mod:`builder.quantize.agreement`): ``positions - 1``
    tokens each, cut in turn from the calibration prompts' text (never a held-out one), repeated when it runs short."""
    tokens = tokenizer.encode(" ".join(files.calibration_prompts), add_special_tokens=False).ids or [0]
    stream = np.resize(np.asarray(tokens, dtype=np.int64), count * (positions - 1))
    return tuple(stream[i * (positions - 1):(i + 1) * (positions - 1)] for i in range(count))


def server_preprocessor(spec: BuildSpec, facts: ModelFacts, tokenizer_path: Path) -> Preprocessor:
    """The server's preprocessing; the chat template files lie beside the tokenizer, as in the repository."""
    return Preprocessor(facts, load_tokenizer(str(tokenizer_path)), ChatPrompt.load(tokenizer_path.parent),
                        RequestLimits.from_spec(spec.limits))


def load_samples(files: CalibrationFiles, preprocess: Preprocessor) -> CalibrationSamples:
    def request(prompt: str, image: Path | None = None, audio: Path | None = None) -> ModelInputs:
        try:
            return preprocess(prompt, [image.read_bytes()] if image else [], [audio.read_bytes()] if audio else [])
        except RequestError as exc:  # it names the problem; say which file it was
            raise BuildError(f"calibration sample {image or audio or prompt!r}: {exc}") from None

    def split(values: list[dict[str, np.ndarray]]) -> Split:
        return Split(tuple(values[: files.samples]), tuple(values[files.samples :]))

    facts = preprocess.facts

    def one_image(inputs: ModelInputs) -> dict[str, np.ndarray]:
        (height, width), = inputs.image_sizes
        assert facts.image is not None
        return image_layout(facts.image).graph_feeds(np.ascontiguousarray(inputs.pixel_values[:, :, :height, :width]))

    pixels = split([one_image(request("image", image=p)) for p in files.images]) if files.images else None
    clips = [request("audio", audio=p) for p in files.audio]
    features = split([audio_layout(facts.audio).graph_feeds(c.input_features, c.audio_frames) for c in clips]) \
        if clips and facts.audio is not None else None
    media = [kind for kind, present in (("image", files.images), ("audio", files.audio)) if present]

    def held_out(n: int, i: int) -> ModelInputs:
        """Held-out request n (file i): its prompt with the model's media kinds taking turns; text alone without."""
        kind = media[n % len(media)] if media else None
        return request(files.prompts[i], image=files.images[i] if kind == "image" else None,
                       audio=files.audio[i] if kind == "audio" else None)

    prompts = tuple(held_out(n, i) for n, i in enumerate(range(files.samples, files.samples + files.holdout)))
    return CalibrationSamples(pixels, features, prompts)
