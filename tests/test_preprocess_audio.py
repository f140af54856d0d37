"""Audio preprocessing: equality with HF Whisper features, WAV decoding, resampling, every rejection's message."""

from __future__ import annotations

import io
import struct
import wave

import numpy as np
import pytest

from builder.runtime.audio import AudioLimits, audio_to_clips, decode_wav, log_mel, mel_filter_bank, resample
from builder.runtime.errors import RequestError

LIMITS = AudioLimits(max_bytes=1 << 22, max_clips=3)
RNG_SEED = 0


def _pcm_wav(ints: np.ndarray, width: int, rate: int = 16000) -> bytes:
    """ints: [frames, channels] integer samples in the signed range of `width` bytes (8-bit: unsigned)."""
    if width == 3:
        raw = ints.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        raw = ints.astype({1: np.uint8, 2: "<i2", 4: "<i4"}[width]).tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(ints.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return buf.getvalue()


def _riff_wav(tag: int, channels: int, rate: int, bits: int, payload: bytes, sub_tag: int | None = None) -> bytes:
    """A WAV with any format tag (what `wave` cannot write): float, extensible, mu-law..."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    if sub_tag is not None:  # WAVE_FORMAT_EXTENSIBLE: cbSize, valid bits, channel mask, SubFormat GUID
        guid = struct.pack("<H", sub_tag) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt += struct.pack("<HHI", 22, bits, 0) + guid
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


# ---------------------------------------------------------------- features vs HF


@pytest.mark.parametrize("n_mels", [16, 80, 128])
def test_mel_filter_bank_matches_hf(n_mels: int) -> None:
    from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank

    expected = hf_mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    )
    np.testing.assert_array_equal(mel_filter_bank(n_mels), expected)


def _whisper(n_mels: int, clip_seconds: int):  # type: ignore[no-untyped-def]
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(
        feature_size=n_mels, sampling_rate=16000, hop_length=160, chunk_length=clip_seconds, n_fft=400
    )


@pytest.mark.parametrize(("n_mels", "clip_seconds"), [(16, 2), (80, 2), (16, 30), (80, 30)])
@pytest.mark.parametrize("fraction", [0.37, 1.0, 1.5])  # shorter than, equal to, longer than the clip
def test_log_mel_matches_hf_whisper_numpy_path(
    n_mels: int, clip_seconds: int, fraction: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.models.whisper.feature_extraction_whisper as hf_whisper

    # With torch installed __call__ takes the torch STFT path; force the numpy one (what we reproduce).
    monkeypatch.setattr(hf_whisper, "is_torch_available", lambda: False)
    n_samples = clip_seconds * 16000
    rng = np.random.default_rng(RNG_SEED)
    samples = (0.2 * rng.standard_normal(int(n_samples * fraction))).astype(np.float32)
    samples[: len(samples) // 3] *= 0.01  # a quiet stretch so the max - 8 floor is exercised

    extractor = _whisper(n_mels, clip_seconds)
    expected = extractor(samples, sampling_rate=16000, return_tensors="np", device="cpu")["input_features"][0]
    got = log_mel(samples, mel_filter_bank(n_mels), n_samples)
    assert got.dtype == np.float32 and got.shape == (n_mels, n_samples // 160) == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_log_mel_close_to_hf_whisper_torch_path() -> None:
    samples = (0.2 * np.random.default_rng(1).standard_normal(3 * 16000)).astype(np.float32)
    expected = _whisper(80, 30)(samples, sampling_rate=16000, return_tensors="np")["input_features"][0]
    np.testing.assert_allclose(log_mel(samples, mel_filter_bank(80), 30 * 16000), expected, rtol=0, atol=1e-3)


def test_audio_to_clips_splits_and_pads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Voxtral's processor: Whisper features of the signal padded to whole clips, reshaped into clips."""
    import transformers.models.whisper.feature_extraction_whisper as hf_whisper

    monkeypatch.setattr(hf_whisper, "is_torch_available", lambda: False)
    filters = mel_filter_bank(16)
    samples = (0.1 * np.random.default_rng(2).standard_normal(5 * 16000 + 123)).astype(np.float32)
    samples[: 2 * 16000] *= 0.001  # a quiet first clip: its floor is the whole signal's max - 8
    clips = audio_to_clips(samples, filters, 2 * 16000, 0, LIMITS)
    assert clips.shape == (3, 16, 200) and clips.dtype == np.float32
    extractor = _whisper(16, 2)
    whole = extractor(samples, sampling_rate=16000, return_tensors="np", padding=True, truncation=False,
                      pad_to_multiple_of=2 * 16000, device="cpu")["input_features"][0]
    expected = whole.reshape(16, -1, 200).transpose(1, 0, 2)  # VoxtralProcessor._retrieve_input_features
    np.testing.assert_allclose(clips, expected, rtol=0, atol=1e-4)
    exact = audio_to_clips(samples[: 4 * 16000], filters, 2 * 16000, 0, LIMITS)
    assert exact.shape == (2, 16, 200)


def test_audio_to_clips_rejects_too_long() -> None:
    samples = np.zeros(7 * 16000, dtype=np.float32)
    with pytest.raises(RequestError) as info:
        audio_to_clips(samples, mel_filter_bank(16), 2 * 16000, 4, LIMITS)
    assert str(info.value) == "audio[4]: 7.00 s of audio needs 4 clips of 2 s; the limit is 3 clips (6 s)"


def test_audio_to_clips_rejects_empty() -> None:
    with pytest.raises(RequestError, match=r"^audio\[0\]: no samples"):
        audio_to_clips(np.zeros(0, np.float32), mel_filter_bank(16), 32000, 0, LIMITS)


# ---------------------------------------------------------------- WAV decoding

_SCALE = {1: 128.0, 2: 2.0**15, 3: 2.0**23, 4: 2.0**31}


@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("channels", [1, 2])
def test_decode_pcm_round_trip(width: int, channels: int) -> None:
    rng = np.random.default_rng(width * 10 + channels)
    lo, hi = (0, 256) if width == 1 else (-(2 ** (8 * width - 1)), 2 ** (8 * width - 1))
    ints = rng.integers(lo, hi, size=(1000, channels), dtype=np.int64)
    ints[0] = lo  # the extremes
    ints[1] = hi - 1
    samples, rate = decode_wav(_pcm_wav(ints, width, rate=22050), 0, LIMITS)
    signed = ints - 128 if width == 1 else ints
    expected = (signed / _SCALE[width]).mean(axis=1).astype(np.float32)
    assert rate == 22050 and samples.dtype == np.float32 and samples.shape == (1000,)
    np.testing.assert_array_equal(samples, expected)
    assert samples.min() >= -1.0 and samples.max() <= 1.0


def test_decode_float32_wav() -> None:
    values = np.array([[0.0, 0.5], [-0.25, 1.5], [-2.0, 0.125]], dtype="<f4")  # out-of-range is clipped
    samples, rate = decode_wav(_riff_wav(3, 2, 48000, 32, values.tobytes()), 0, LIMITS)
    assert rate == 48000
    np.testing.assert_array_equal(samples, np.array([0.25, 0.375, -0.4375], dtype=np.float32))


@pytest.mark.parametrize(("sub_tag", "bits", "payload", "expected"), [
    (1, 16, np.array([16384, -32768], "<i2").tobytes(), [0.5, -1.0]),
    (3, 32, np.array([0.75, -0.5], "<f4").tobytes(), [0.75, -0.5]),
])  # fmt: skip
def test_decode_wave_format_extensible(sub_tag: int, bits: int, payload: bytes, expected: list[float]) -> None:
    samples, rate = decode_wav(_riff_wav(0xFFFE, 1, 16000, bits, payload, sub_tag=sub_tag), 0, LIMITS)
    assert rate == 16000
    np.testing.assert_array_equal(samples, np.array(expected, dtype=np.float32))


def _rejects(data: bytes, *fragments: str, limits: AudioLimits = LIMITS, index: int = 2) -> None:
    with pytest.raises(RequestError) as info:
        decode_wav(data, index, limits)
    message = str(info.value)
    assert message.startswith(f"audio[{index}]: "), message
    for fragment in fragments:
        assert fragment in message, message


_GOOD = _pcm_wav(np.zeros((800, 1), np.int64), 2)


def test_rejects_empty() -> None:
    _rejects(b"", "empty (0 bytes)")


def test_rejects_too_many_bytes() -> None:
    _rejects(_GOOD, f"{len(_GOOD)} bytes is over the limit of 1000 bytes", limits=AudioLimits(1000, 3))


def test_rejects_not_wav() -> None:
    _rejects(b"ID3\x03\x00 definitely an mp3" * 4, "not a valid WAV file", "RIFF")


def test_rejects_truncated_header() -> None:
    _rejects(_GOOD[:30], "not a valid WAV file")


def test_rejects_truncated_data() -> None:
    _rejects(_GOOD[:-101], "truncated WAV data (1499 of 1600 bytes)")


def test_rejects_more_than_two_channels() -> None:
    _rejects(_pcm_wav(np.zeros((10, 6), np.int64), 2), "6 channels", "mono or stereo")


@pytest.mark.parametrize("rate", [4000, 7999, 96001, 192000])
def test_rejects_sample_rate(rate: int) -> None:
    _rejects(_pcm_wav(np.zeros((10, 1), np.int64), 2, rate=rate), f"sample rate {rate} Hz", "8000-96000 Hz")


def test_rejects_no_samples() -> None:
    _rejects(_pcm_wav(np.zeros((0, 1), np.int64), 2), "no samples")


def test_rejects_float64() -> None:
    _rejects(_riff_wav(3, 1, 16000, 64, np.zeros(4, "<f8").tobytes()), "64-bit float WAV", "32-bit float")


def test_rejects_non_finite_float() -> None:
    _rejects(_riff_wav(3, 1, 16000, 32, np.array([0.1, np.nan], "<f4").tobytes()), "NaN or infinite")


def test_rejects_other_encodings() -> None:
    _rejects(_riff_wav(7, 1, 8000, 8, b"\x00" * 10), "unsupported WAV encoding (format tag 7)", "PCM")


def test_rejects_truncated_float_data() -> None:
    full = _riff_wav(3, 1, 16000, 32, np.zeros(100, "<f4").tobytes())
    _rejects(full[:-10], "truncated WAV data (390 of 400 bytes)")


# ---------------------------------------------------------------- resampling


def _tone(freq: float, rate: int, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 24000, 44100, 48000, 96000, 44101])
@pytest.mark.parametrize("freq", [440.0, 3000.0])
def test_resample_keeps_frequency_and_amplitude(rate: int, freq: float) -> None:
    out = resample(_tone(freq, rate).astype(np.float32), rate)
    assert out.dtype == np.float32 and len(out) == 16000
    core = slice(800, -800)  # away from the zero-padded edges
    np.testing.assert_allclose(out[core], _tone(freq, 16000)[core], rtol=0, atol=1e-4)


def test_resample_passband_and_anti_aliasing() -> None:
    def gain(freq: float) -> float:
        out = resample(_tone(freq, 44100).astype(np.float32), 44100)[800:-800]
        return float(np.sqrt(np.mean(out.astype(np.float64) ** 2)) / (0.5 / np.sqrt(2)))

    assert abs(gain(6000.0) - 1) < 1e-3  # flat passband
    for alias in (8600.0, 10000.0, 15000.0, 20000.0):  # would fold back into 0-8 kHz
        assert gain(alias) < 10 ** (-70 / 20), alias


def test_resample_lengths_and_identity() -> None:
    x = np.random.default_rng(3).standard_normal(12345).astype(np.float32)
    np.testing.assert_array_equal(resample(x, 16000), x)
    assert len(resample(x, 44100)) == -(-12345 * 160 // 441)
    assert len(resample(x, 8000)) == 2 * 12345


@pytest.mark.parametrize("rate", [7999, 96001, 0])
def test_resample_rejects_rate(rate: int) -> None:
    with pytest.raises(RequestError, match=f"sample rate {rate} Hz is outside the accepted 8000-96000 Hz"):
        resample(np.zeros(10, np.float32), rate)


def test_resample_matches_scipy_in_band() -> None:
    signal = pytest.importorskip("scipy.signal")
    rng = np.random.default_rng(4)
    # Band-limited test signal: a sum of tones below 6 kHz, where both resamplers are flat.
    t = np.arange(44100 * 2) / 44100
    x = sum(rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in (150, 900, 2500, 5500))
    ours = resample(x.astype(np.float32), 44100)
    theirs = signal.resample_poly(x, 160, 441, window=("kaiser", 10.0))
    assert len(ours) == len(theirs)
    np.testing.assert_allclose(ours[2000:-2000], theirs[2000:-2000], rtol=0, atol=2e-4)
