"""Running the encoder graphs on the media of one request or of several batched together, the same
way in Triton and in-process. Images come padded to the largest with their own sizes; the vision
graph takes same-size images, so each size (across all the requests) runs as one batch, and every
request gets its own embeddings back in image order. Clips come with the mel frames each one's encoder
attends to: a graph that masks padding takes them as ``feature_attention_mask``, and each clip keeps the
tokens its frames give.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from .model_facts import AudioFacts, ImageFacts, ModelFacts
from .preprocess import ModelInputs, fuse_embeddings

# Graph inputs by name -> [batch, tokens, hidden]; given more inputs than its graph takes, a run uses its own.
EncoderRun = Callable[[dict[str, np.ndarray]], np.ndarray]


def encoder_session(path: str) -> ort.InferenceSession:
    """An encoder graph on ONNX Runtime's CPU provider, its threads idle between runs. An encoder runs once per
    request and something else runs next (the other encoder, prefill, decode steps): by default ORT's threads
    spin on after a run and hold the cores it needs (one process, an image then a clip: 167 ms, 127 without)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def session_run(session: ort.InferenceSession, output: str | None = None) -> EncoderRun:
    """An ONNX Runtime session as an :data:`EncoderRun` (its first output unless ``output`` names one)."""
    names = [i.name for i in session.get_inputs()]
    return lambda feeds: session.run([output] if output else None, {name: feeds[name] for name in names})[0]


def audio_feeds(features: np.ndarray, frames: np.ndarray) -> dict[str, np.ndarray]:
    """A batch of clips as the audio graphs take it: features, and (HF's) mask of the frames each one attends to."""
    mask = np.arange(features.shape[-1])[None, :] < np.asarray(frames, dtype=np.int64)[:, None]
    return {"input_features": features, "feature_attention_mask": mask.astype(np.int64)}


def chunked_audio_feeds(audio: AudioFacts, features: np.ndarray, frames: np.ndarray) -> dict[str, np.ndarray]:
    """Clips as a chunked audio graph takes them (Qwen2.5-Omni's ``chunk_and_pad_features`` and the index helpers
    of its audio tower, in numpy): every clip's own frames cut into chunks of ``chunk_frames``, padded to the
    longest chunk; which convolved positions are real; the first of each pooled pair; the chunks' bounds."""
    chunks = [features[c, :, start:min(start + audio.chunk_frames, int(n))]
              for c, n in enumerate(frames) for start in range(0, int(n), audio.chunk_frames)]
    lengths = np.array([chunk.shape[1] for chunk in chunks], np.int64)
    padded = np.zeros((len(chunks), features.shape[1], int(lengths.max())), np.float32)
    for k, chunk in enumerate(chunks):
        padded[k, :, : chunk.shape[1]] = chunk
    convolved = (lengths - 1) // 2 + 1  # positions after the stride-2 convolution, per chunk
    valid = np.flatnonzero(np.arange(convolved.max())[None, :] < convolved[:, None])
    clip_convolved = (np.asarray(frames, np.int64) - 1) // 2 + 1
    starts = np.concatenate([[0], np.cumsum(clip_convolved)[:-1]])
    pool = np.concatenate([start + 2 * np.arange(audio.clip_tokens(int(n))) for start, n in zip(starts, frames)])
    return {"padded_feature": padded, "chunk_lengths": lengths, "valid_indices": valid.astype(np.int64),
            "pool_indices": pool.astype(np.int64), "cu_seqlens": np.concatenate([[0], np.cumsum(convolved)]).astype(np.int32)}


def qwen_vl_image_feeds(image: ImageFacts, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Same-size images ``[N, 3, H, W]`` as Qwen2-VL's vision graph takes them: the patches (each ``[C, T, p, p]``,
    the still image repeated over T, ordered merge-group by merge-group) and the index tensors HF's vision helpers
    compute (``get_vision_position_ids``, ``get_vision_window_index``, the images' and windows' bounds)."""
    count, channels, height, width = pixels.shape
    p, m, frames = image.patch_size, image.merge_size, image.temporal_patch_size
    rows, cols = height // p, width // p
    x = pixels.reshape(count, channels, rows // m, m, p, cols // m, m, p).transpose(0, 2, 5, 3, 6, 1, 4, 7)
    x = np.broadcast_to(x[:, :, :, :, :, :, None], (*x.shape[:6], frames, p, p))
    patches = np.ascontiguousarray(x.reshape(count * rows * cols, channels * frames * p * p))
    # (row, col) of each patch, merge-group major.
    grid_rows = np.arange(rows)[:, None].repeat(cols, 1).reshape(rows // m, m, cols // m, m).transpose(0, 2, 1, 3)
    grid_cols = np.arange(cols)[None, :].repeat(rows, 0).reshape(rows // m, m, cols // m, m).transpose(0, 2, 1, 3)
    rotary = np.tile(np.stack([grid_rows.reshape(-1), grid_cols.reshape(-1)], -1), (count, 1))
    # Windows of side cells of merged tokens, edge windows smaller; HF pads a whole extra window when a side divides.
    side, merged_rows, merged_cols = image.window_size // image.cell, rows // m, cols // m
    pad_rows, pad_cols = side - merged_rows % side, side - merged_cols % side
    index = np.pad(np.arange(merged_rows * merged_cols).reshape(merged_rows, merged_cols), ((0, pad_rows), (0, pad_cols)),
                   constant_values=-1)
    windows = index.reshape((merged_rows + pad_rows) // side, side, (merged_cols + pad_cols) // side, side)
    windows = windows.transpose(0, 2, 1, 3).reshape(-1, side * side)
    sizes = (windows >= 0).sum(1)
    order = windows.reshape(-1)
    order = order[order >= 0]
    per_image = merged_rows * merged_cols
    window_index = np.concatenate([order + k * per_image for k in range(count)])
    window_bounds = np.concatenate([[0], np.cumsum(np.tile(sizes[sizes > 0], count)) * m * m])
    return {"pixel_patches": patches, "rotary_pos_ids": rotary.astype(np.int64), "window_index": window_index.astype(np.int64),
            "cu_seqlens": (np.arange(count + 1) * rows * cols).astype(np.int32), "cu_window_seqlens": window_bounds.astype(np.int32)}


def image_feeds(image: ImageFacts | None, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Same-size images ``[N, 3, H, W]`` as the vision graph takes them."""
    return qwen_vl_image_feeds(image, pixels) if image is not None and image.layout == "qwen_vl" else {"pixel_values": pixels}


def audio_graph_feeds(audio: AudioFacts, features: np.ndarray, frames: np.ndarray) -> dict[str, np.ndarray]:
    """Clips as the audio graph takes them."""
    return chunked_audio_feeds(audio, features, frames) if audio.layout == "chunked" else audio_feeds(features, frames)


def encode_images(run: EncoderRun, requests: Sequence[tuple[np.ndarray, np.ndarray]], image: ImageFacts | None,
                  hidden: int) -> list[np.ndarray]:
    """Per request ``[N, 3, Hmax, Wmax]`` pixels + ``[N, 2]`` sizes -> its ``[tokens, hidden]``, image after image."""
    images = [(r, i, tuple(int(v) for v in size)) for r, (_, sizes) in enumerate(requests) for i, size in enumerate(sizes)]
    pieces: dict[tuple[int, int], np.ndarray] = {}
    for height, width in dict.fromkeys(size for _, _, size in images):
        group = [(r, i) for r, i, size in images if size == (height, width)]
        pixels = np.ascontiguousarray(np.stack([requests[r][0][i, :, :height, :width] for r, i in group]))
        embeds = run(image_feeds(image, pixels)).reshape(len(group), -1, hidden)
        pieces.update(zip(group, embeds))
    return [_joined([pieces[(r, i)] for i in range(len(sizes))], hidden) for r, (_, sizes) in enumerate(requests)]


def encode_clips(run: EncoderRun, requests: Sequence[tuple[np.ndarray, np.ndarray]], audio: AudioFacts,
                 hidden: int) -> list[np.ndarray]:
    """Per request ``[clips, mels, frames]`` + each clip's attended frames -> its ``[tokens, hidden]``: all the
    clips in one run, each keeping the tokens its frames give."""
    counts = [len(features) for features, _ in requests]
    if not sum(counts):
        return [np.zeros((0, hidden), np.float32) for _ in requests]
    frames = np.concatenate([f for _, f in requests])
    longest = max(features.shape[-1] for features, _ in requests if len(features))  # "chunked": requests' own widths
    features = np.concatenate([np.pad(f, ((0, 0), (0, 0), (0, longest - f.shape[-1]))) for f, _ in requests])
    embeds = run(audio_graph_feeds(audio, features, frames))
    if audio.layout == "chunked":  # [all the clips' tokens, hidden], clip after clip
        embeds = np.split(embeds, np.cumsum([audio.clip_tokens(int(n)) for n in frames])[:-1])
    kept = [clip[: audio.clip_tokens(int(n))] for clip, n in zip(embeds, frames)]
    bounds = np.cumsum([0, *counts])
    return [_joined(kept[start:end], hidden) for start, end in zip(bounds[:-1], bounds[1:])]


def encode_requests(run: EncoderRun, requests: Sequence[Mapping[str, np.ndarray]], facts: ModelFacts) -> list[np.ndarray]:
    """Each request's encoder inputs (``pixel_values`` + ``image_sizes``, or ``input_features`` + ``audio_frames``)
    -> its embeddings."""
    if requests and "pixel_values" in requests[0]:
        return encode_images(run, [(r["pixel_values"], r["image_sizes"]) for r in requests], facts.image, facts.hidden_size)
    assert facts.audio is not None
    return encode_clips(run, [(r["input_features"], r["audio_frames"]) for r in requests], facts.audio, facts.hidden_size)


def _joined(pieces: list[np.ndarray], hidden: int) -> np.ndarray:
    return np.concatenate([p.reshape(-1, hidden) for p in pieces]) if pieces else np.zeros((0, hidden), np.float32)


def embed_request(inputs: ModelInputs, sessions: Mapping[str, ort.InferenceSession], facts: ModelFacts) -> tuple[np.ndarray, np.ndarray]:
    """What the ensemble does before the LLM, in this process: encode the media, place it at its tokens.

    ``sessions`` maps ``vision_encoder`` / ``audio_encoder`` to a session; one is used only when the
    request has that media, so a text-only request needs none.
    """
    def run(name: str) -> EncoderRun:
        return lambda feeds: session_run(sessions[name])(feeds)

    hidden = facts.hidden_size
    (image,) = encode_images(run("vision_encoder"), [(inputs.pixel_values, inputs.image_sizes)], facts.image, hidden) \
        if facts.image is not None else (np.zeros((0, hidden), np.float32),)
    audio = encode_clips(run("audio_encoder"), [(inputs.input_features, inputs.audio_frames)], facts.audio, hidden)[0] \
        if facts.audio is not None else np.zeros((0, hidden), np.float32)
    return fuse_embeddings(inputs.input_ids, image, audio, facts)
