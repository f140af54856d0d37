"""Every media layout of builder/runtime/media is proven against its model's own processor, and each answers its
protocol as its module says.

``PREPROCESSING_TESTS`` names, per layout, the tests that hold its sizes, placeholders and features to the source
model's processor (served tokens equal to HF's pipeline, or the processor's own output): a layout added to the
table without such a test fails here (as optimum's ``test_all_models_tested``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from builder.runtime.audio import AudioLimits
from builder.runtime.errors import RequestError
from builder.runtime.media import AUDIO_LAYOUTS, IMAGE_LAYOUTS, audio_layout, image_layout
from builder.runtime.model_facts import AudioFacts, ImageFacts

SERVED_AS_HF = "test_served_greedy_tokens_equal_hugging_face_pipeline"
PREPROCESSING_TESTS = {
    "pixtral": ["tests.test_preprocess_image::test_matches_hf_pixtral_pil_processor",
                f"tests.test_real_checkpoint::{SERVED_AS_HF}"],
    "fixed": [f"tests.test_gemma3_checkpoint::{SERVED_AS_HF}"],
    "qwen_vl": [f"tests.test_qwen25_omni_checkpoint::{SERVED_AS_HF}",
                "tests.test_qwen25_omni_checkpoint::test_an_image_of_extreme_aspect_ratio_is_refused"],
    "windows": ["tests.test_preprocess_audio::test_audio_to_clips_splits_and_pads",
                f"tests.test_voxtral_checkpoint::{SERVED_AS_HF}"],
    "masked": [f"tests.test_qwen2_audio_checkpoint::{SERVED_AS_HF}",
               "tests.test_qwen2_audio_checkpoint::test_audio_the_model_cannot_take_whole_is_refused"],
    "chunked": [f"tests.test_qwen25_omni_checkpoint::{SERVED_AS_HF}"],
}

NORMALIZE = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
PIXTRAL = ImageFacts(token=10, row_break=12, end=13, patch_size=14, merge_size=2, longest_edge=1540, token_text="[IMG]",
                     **NORMALIZE)
FIXED = ImageFacts(token=20, row_break=0, end=0, patch_size=14, merge_size=4, longest_edge=56, token_text="<img>",
                   layout="fixed", tokens_per_image=5, expansion="<img>" * 5, **NORMALIZE)
QWEN_VL = ImageFacts(token=30, row_break=0, end=0, patch_size=14, merge_size=2, longest_edge=0, token_text="<|IMAGE|>",
                     layout="qwen_vl", min_pixels=3136, max_pixels=200_000, temporal_patch_size=2, window_size=112,
                     **NORMALIZE)
# 2 s windows of 200 mel frames; 4 positions per token: 25 tokens per window (the "masked" and "chunked" layouts: 2).
WINDOWS = AudioFacts(token=40, begin=41, num_mel_bins=16, clip_samples=32_000, hop_length=160, positions_per_token=4,
                     layout="windows", token_text="[AUDIO]")
MASKED = AudioFacts(token=50, begin=None, num_mel_bins=16, clip_samples=32_000, hop_length=160, positions_per_token=2,
                    layout="masked", token_text="<|AUDIO|>")
CHUNKED = AudioFacts(token=60, begin=None, num_mel_bins=16, clip_samples=32_000, hop_length=160, positions_per_token=2,
                     layout="chunked", token_text="<|AUDIO|>", chunk_frames=50)
LIMITS = AudioLimits(max_bytes=10**8, max_clips=4)


def test_every_layout_has_a_preprocessing_test() -> None:
    assert not IMAGE_LAYOUTS.keys() & AUDIO_LAYOUTS.keys(), "an image and an audio layout share a name"
    assert PREPROCESSING_TESTS.keys() == IMAGE_LAYOUTS.keys() | AUDIO_LAYOUTS.keys()
    for layout, tests in PREPROCESSING_TESTS.items():
        for test in tests:
            module, name = test.split("::")
            assert callable(getattr(importlib.import_module(module), name, None)), f"{layout}: {test} does not exist"


def test_the_built_repository_holds_every_layout_module(built_repository: Path) -> None:
    """The runtime is copied into each Python model with its subpackages: the layouts import from there."""
    media = built_repository / "preprocess" / "1" / "mmtb_runtime" / "media"
    for layout in (*IMAGE_LAYOUTS.values(), *AUDIO_LAYOUTS.values()):
        assert (media / f"{layout.__module__.rsplit('.', 1)[-1]}.py").is_file(), layout.__module__


def test_pixtral_keeps_the_aspect_ratio_in_rows_ended_by_breaks() -> None:
    layout = image_layout(PIXTRAL)
    assert layout.resized_size(480, 640, 0) == (18 * 28, 23 * 28)
    assert layout.placeholders(56, 84) == [10, 10, 10, 12, 10, 10, 10, 13]
    assert layout.most_tokens() == 55 * 56  # a 1540 px square: 55 rows of 55 and a break
    assert layout.batchable and not layout.expanded_in_text
    with pytest.raises(RequestError, match=r"image\[2\]: 5000x1 is too narrow"):
        layout.resized_size(1, 5000, 2)


def test_fixed_squashes_every_image_to_one_square_expanded_in_the_text() -> None:
    layout = image_layout(FIXED)
    assert layout.resized_size(1, 5000, 0) == layout.resized_size(300, 200, 1) == (56, 56)
    assert layout.placeholders(56, 56) == [20] * 5 and layout.most_tokens() == 5
    assert layout.batchable and layout.expanded_in_text
    assert list(layout.graph_feeds(np.zeros((2, 3, 56, 56), np.float32))) == ["pixel_values"]


def test_qwen_vl_gives_a_token_per_cell_and_patches_the_graph_takes_in_one_call() -> None:
    layout = image_layout(QWEN_VL)
    assert layout.resized_size(61, 97, 0) == (56, 84)  # each side rounded to whole 28 px cells
    assert layout.placeholders(56, 84) == [30] * 6  # 2 x 3 cells, no row breaks
    assert layout.most_tokens() == 200_000 // 28**2
    assert not layout.batchable and not layout.expanded_in_text
    with pytest.raises(RequestError, match=r"image\[1\]: 5000x10 has an aspect ratio over 200"):
        layout.resized_size(10, 5000, 1)
    feeds = layout.graph_feeds(np.zeros((2, 3, 56, 112), np.float32))
    assert feeds["pixel_patches"].shape == (2 * 4 * 8, 3 * 2 * 14 * 14)  # 2 images of 4 x 8 patches, 2 frames each
    assert feeds["cu_seqlens"].tolist() == [0, 32, 64]


def test_windows_cut_an_input_into_whole_windows_and_keep_each_ones_tokens() -> None:
    layout = audio_layout(WINDOWS)
    assert layout.clip_frames(50_000, 16_000, 0, LIMITS) == [200, 200]
    assert layout.clip_width == 200 and layout.batchable
    with pytest.raises(RequestError, match=r"audio\[3\]: .* needs 5 clips"):
        layout.clip_frames(5 * 32_000, 16_000, 3, LIMITS)
    frames = np.array([200, 200])
    assert [clip.shape for clip in layout.clip_embeddings(np.zeros((2, 30, 8)), frames)] == [(25, 8), (25, 8)]


def test_masked_takes_one_window_whose_padding_is_masked() -> None:
    layout = audio_layout(MASKED)
    assert layout.clip_frames(16_000, 16_000, 0, LIMITS) == [100] and layout.clip_width == 200 and layout.batchable
    with pytest.raises(RequestError, match=r"audio\[1\]: 2.50 s is longer than this model's 2 s window"):
        layout.clip_frames(40_000, 16_000, 1, LIMITS)
    feeds = layout.graph_feeds(np.zeros((1, 16, 200), np.float32), np.array([100]))
    assert feeds["feature_attention_mask"].sum() == 100


def test_chunked_sends_each_clips_own_frames_in_chunks_and_splits_the_tokens_by_clip() -> None:
    layout = audio_layout(CHUNKED)
    assert layout.clip_frames(16_000, 16_000, 0, LIMITS) == [100] and layout.clip_width is None and not layout.batchable
    frames = np.array([120, 60])
    feeds = layout.graph_feeds(np.zeros((2, 16, 120), np.float32), frames)
    assert feeds["chunk_lengths"].tolist() == [50, 50, 20, 50, 10]
    tokens = [CHUNKED.clip_tokens(120), CHUNKED.clip_tokens(60)]
    pieces = layout.clip_embeddings(np.zeros((sum(tokens), 8)), frames)
    assert [len(piece) for piece in pieces] == tokens
