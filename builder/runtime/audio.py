"""Decode untrusted WAV bytes, resample (soxr) and compute Whisper-style log-mel clips (numpy + stdlib otherwise).

``log_mel`` reproduces ``WhisperFeatureExtractor._np_extract_fbank_features`` (the numpy path of
``transformers.audio_utils.spectrogram``), including its dtypes: float64 FFT stored as complex64.
"""

from __future__ import annotations

import io
import struct
import wave
from dataclasses import dataclass

import numpy as np
import soxr

from .contract import FEATURE_ATTENTION_MASK, INPUT_FEATURES
from .errors import RequestError
from .model_facts import AudioFacts

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
MIN_RATE, MAX_RATE = 8000, 96000
_FLOAT, _EXTENSIBLE = 3, 0xFFFE  # WAVE format tags `wave` (3.11) does not read


@dataclass(frozen=True)
class AudioLimits:
    max_bytes: int
    max_clips: int  # per audio input, each clip_samples long


def decode_wav(data: bytes, index: int, limits: AudioLimits) -> tuple[np.ndarray, int]:
    """PCM 8/16/24/32-bit or float32 WAV, mono or stereo -> (mono float32 samples in [-1, 1], sample rate)."""
    name = f"audio[{index}]"
    if len(data) == 0:
        raise RequestError(f"{name}: empty (0 bytes); send a WAV file")
    if len(data) > limits.max_bytes:
        raise RequestError(f"{name}: {len(data)} bytes is over the limit of {limits.max_bytes} bytes")
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            frames, is_float = w.readframes(w.getnframes()), False
            expected = w.getnframes() * channels * width
    except wave.Error as e:
        if not str(e).startswith("unknown"):  # "unknown format: 3", 3.12+: "unknown extended format"
            raise RequestError(f"{name}: not a valid WAV file ({e})") from None
        channels, width, rate, frames, is_float, expected = _read_riff(data, name)
    except (EOFError, struct.error) as e:
        raise RequestError(f"{name}: not a valid WAV file (truncated header: {str(e) or 'unexpected end of data'})") from None
    if not 1 <= channels <= 2:
        raise RequestError(f"{name}: {channels} channels; only mono or stereo (1 or 2) are accepted")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise RequestError(f"{name}: sample rate {rate} Hz is outside the accepted {MIN_RATE}-{MAX_RATE} Hz")
    if width not in (1, 2, 3, 4) or (is_float and width != 4):
        kind = "float" if is_float else "PCM"
        raise RequestError(f"{name}: {8 * width}-bit {kind} WAV; accepted: 8/16/24/32-bit PCM or 32-bit float")
    if len(frames) < expected or len(frames) % (channels * width):
        raise RequestError(f"{name}: truncated WAV data ({len(frames)} of {expected} bytes)")
    if expected == 0:
        raise RequestError(f"{name}: WAV file has no samples")
    if is_float:
        x = np.frombuffer(frames, "<f4").astype(np.float64)
        if not np.isfinite(x).all():
            raise RequestError(f"{name}: float WAV contains NaN or infinite samples")
        x = np.clip(x, -1.0, 1.0)
    elif width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(frames, np.uint8).astype(np.float64) - 128) / 128
    elif width == 3:  # little-endian 24-bit: put the 3 bytes in the top of an int32
        padded = np.zeros((len(frames) // 3, 4), np.uint8)
        padded[:, 1:] = np.frombuffer(frames, np.uint8).reshape(-1, 3)
        x = padded.view("<i4")[:, 0].astype(np.float64) / 2.0**31
    else:
        x = np.frombuffer(frames, f"<i{width}").astype(np.float64) / 2.0 ** (8 * width - 1)
    return x.reshape(-1, channels).mean(axis=1).astype(np.float32), rate


def _read_riff(data: bytes, name: str) -> tuple[int, int, int, bytes, bool, int]:
    """Minimal RIFF walk for what `wave` rejects: IEEE float and WAVE_FORMAT_EXTENSIBLE (PCM or float)."""
    fmt: tuple[int, int, int, int] | None = None
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = data[pos + 8 : pos + 8 + size]
        if chunk_id == b"fmt " and len(body) >= 16:
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            if tag == _EXTENSIBLE and len(body) >= 26:
                tag = struct.unpack_from("<H", body, 24)[0]  # first 2 bytes of the SubFormat GUID
            fmt = (tag, channels, rate, bits)
        elif chunk_id == b"data" and fmt is not None:
            tag, channels, rate, bits = fmt
            if tag not in (1, _FLOAT) or bits % 8:
                break
            return channels, bits // 8, rate, body, tag == _FLOAT, size
        pos += 8 + size + (size & 1)  # chunks are word aligned
    tag_text = f"format tag {fmt[0]}" if fmt else "no fmt chunk"
    raise RequestError(f"{name}: unsupported WAV encoding ({tag_text}); send PCM or 32-bit float WAV")


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """float32 samples at ``rate`` Hz to ``target`` Hz with soxr's "HQ" quality: what mistral-common (Voxtral's
    processor) does, and librosa's default, which Hugging Face's audio examples use to load 16 kHz audio."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise RequestError(f"sample rate {rate} Hz is outside the accepted {MIN_RATE}-{MAX_RATE} Hz")
    x = np.asarray(samples, dtype=np.float32)
    if rate == target or len(x) == 0:
        return x
    return np.asarray(soxr.resample(x, rate, target, quality="HQ"), dtype=np.float32)


def mel_filter_bank(n_mels: int, sampling_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-scale, Slaney-normalized triangular filters from 0 to 8 kHz: float64 [n_fft // 2 + 1, n_mels]."""

    def hz_to_mel(f: np.ndarray) -> np.ndarray:  # linear below 1 kHz, logarithmic above
        log_part = 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) * (27.0 / np.log(6.4))
        return np.where(f >= 1000.0, log_part, 3.0 * f / 200.0)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)), 200.0 * m / 3.0)

    mels = np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(8000.0)), n_mels + 2)
    edges = mel_to_hz(mels)
    fft_freqs = np.linspace(0, sampling_rate // 2, n_fft // 2 + 1)
    slopes = edges[None, :] - fft_freqs[:, None]
    widths = np.diff(edges)
    down_slopes = -slopes[:, :-2] / widths[:-1]
    up_slopes = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down_slopes, up_slopes))
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]


def log_mel(samples: np.ndarray, filters: np.ndarray, n_samples: int) -> np.ndarray:
    """Whisper log-mel of ``samples`` padded/truncated to ``n_samples``: float32 [n_mels, n_samples // 160]."""
    x = np.zeros(n_samples, dtype=np.float32)
    clip = np.asarray(samples, dtype=np.float32)[:n_samples]
    x[: len(clip)] = clip
    x = np.pad(x, N_FFT // 2, mode="reflect").astype(np.float64)  # centered frames
    n_frames = 1 + (len(x) - N_FFT) // HOP
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP][:n_frames]
    window = np.hanning(N_FFT + 1)[:-1]  # periodic Hann
    spectrum = np.fft.rfft(frames * window, axis=1).astype(np.complex64)  # HF stores complex64
    power = np.abs(spectrum, dtype=np.float64) ** 2
    mel = np.maximum(1e-10, filters.T @ power.T)
    spec = np.log10(mel).astype(np.float32)[:, :-1]  # Whisper drops the last frame
    spec = np.maximum(spec, spec.max() - 8.0)
    return (spec + 4.0) / 4.0


def resampled_length(n_samples: int, rate: int) -> int:
    """Samples that ``n_samples`` at ``rate`` Hz make at 16 kHz (what :func:`resample` returns)."""
    return -(-n_samples * SAMPLE_RATE // rate)


def clip_count(n_samples: int, rate: int, clip_samples: int, index: int, limits: AudioLimits) -> int:
    """Encoder clips that ``n_samples`` at ``rate`` Hz make once resampled to 16 kHz; checked against the limit.

    Cheap, so the preprocessor calls it before resampling: a 10-minute clip is refused without being resampled.
    """
    n_clips = -(-resampled_length(n_samples, rate) // clip_samples)
    seconds, clip_seconds = n_samples / rate, clip_samples / SAMPLE_RATE
    if n_clips == 0:
        raise RequestError(f"audio[{index}]: no samples")
    if n_clips > limits.max_clips:
        raise RequestError(
            f"audio[{index}]: {seconds:.2f} s of audio needs {n_clips} clips of {clip_seconds:g} s; "
            f"the limit is {limits.max_clips} clips ({limits.max_clips * clip_seconds:g} s)"
        )
    return n_clips


def window_frames(n_samples: int, rate: int, audio: AudioFacts, index: int) -> int:
    """The mel frames of an audio input that is one window, its padding masked (before resampling): refused when
    longer than the window or too short for one token."""
    samples, seconds = resampled_length(n_samples, rate), n_samples / rate
    if samples > audio.clip_samples:  # the model's processor would drop the rest without a word
        raise RequestError(f"audio[{index}]: {seconds:.2f} s is longer than this model's "
                           f"{audio.clip_samples / SAMPLE_RATE:g} s window; send it in parts")
    frames = -(-samples // audio.hop_length)  # Whisper's attention mask: a frame per hop that holds a sample
    if audio.clip_tokens(frames) == 0:
        raise RequestError(f"audio[{index}]: {seconds * 1000:.0f} ms is too short to give this model one audio token")
    return frames


def audio_to_clips(
    samples: np.ndarray, filters: np.ndarray, clip_samples: int, index: int, limits: AudioLimits
) -> np.ndarray:
    """A 16 kHz waveform as encoder clips: float32 [n_clips, n_mels, clip_samples // 160].

    As Voxtral's processor does it: the signal zero-padded to whole clips, one log-mel over all of it (frames at a
    clip boundary see both sides, the max - 8 floor is the whole signal's), then cut into clips.
    """
    n_clips = clip_count(len(samples), SAMPLE_RATE, clip_samples, index, limits)
    mel = log_mel(samples, filters, n_clips * clip_samples)
    return np.ascontiguousarray(mel.reshape(mel.shape[0], n_clips, clip_samples // HOP).transpose(1, 0, 2))


def valid_frames_log_mel(samples: np.ndarray, filters: np.ndarray, frames: int) -> np.ndarray:
    """The first ``frames`` columns of the log-mel of ``samples`` zero-padded to a long window (Qwen2.5-Omni's
    processor pads every clip to 300 s): float32 [n_mels, frames]. Only the frames that overlap the audio differ from
    the floor, so a pad of one FFT window past the last frame gives the same columns and the same max - 8 floor."""
    return log_mel(samples, filters, frames * HOP + N_FFT)[:, :frames]


def audio_feeds(features: np.ndarray, frames: np.ndarray) -> dict[str, np.ndarray]:
    """A batch of clips as the audio graphs take them: features, and (HF's) mask of the frames each one attends to."""
    mask = np.arange(features.shape[-1])[None, :] < np.asarray(frames, dtype=np.int64)[:, None]
    return {INPUT_FEATURES: features, FEATURE_ATTENTION_MASK: mask.astype(np.int64)}
