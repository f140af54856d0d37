"""INT8 encoders of realistic size on this CPU: FP32 vs the CPU layout (U8S8) vs TensorRT's layout (S8S8).

A ViT-B-sized Pixtral vision tower (hidden 768, 12 layers, 224 px) and a Whisper-base-sized Voxtral
audio encoder (hidden 512, 6 layers, 80 mels, 30 s clips), random weights, built with the same
wrappers and exported and quantized with the same code as the build. Calibrated on the shipped
calibration set, cosine measured on its held-out images/speech.

    python benchmarks/int8_encoders.py            # full: many runs (minutes; keep the machine quiet)
    python benchmarks/int8_encoders.py --quick    # smoke run: small encoders, few runs

Writes benchmarks/results/int8/encoders.csv and encoders.png and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import torch

from builder.export.onnx_export import export_graph
from builder.compare import figures, run_onnxruntime
from builder.families.mistral3.export import vision_recipe
from builder.families.voxtral.export import audio_recipe
from builder.quantize.calibration_data import DEFAULT_DIRECTORY
from builder.quantize.qdq import S8S8, U8S8, calibrate, quantize_qdq
from builder.quantize.reader import SampleReader
from builder.runtime.audio import AudioLimits, audio_to_clips, decode_wav, mel_filter_bank, resample
from builder.runtime.image import ImageLimits, decode_image, image_to_pixels
from builder.families.mistral3 import CLIP_MEAN, CLIP_STD, build_audio_modules
from builder.spec import ExportSpec, LimitsSpec
from transformers import Mistral3Config, Mistral3ForConditionalGeneration

RESULTS = Path(__file__).resolve().parent / "results" / "int8"
CALIBRATION, HOLDOUT = 8, 4


@dataclass(frozen=True)
class Row:
    encoder: str
    variant: str
    mb: float
    batch1_ms: float
    batch8_ms: float
    cosine: float


def model_config(quick: bool) -> Mistral3Config:
    layers_v, layers_a, positions = (2, 2, 100) if quick else (12, 6, 1500)
    return Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=272, hidden_size=768, intermediate_size=1024, num_hidden_layers=1,
                         num_attention_heads=12, num_key_value_heads=4, head_dim=64),
        vision_config=dict(model_type="pixtral", hidden_size=768, intermediate_size=3072, num_hidden_layers=layers_v,
                           num_attention_heads=12, head_dim=64, patch_size=16, image_size=224, num_channels=3),
        audio_config=dict(model_type="voxtral_encoder", hidden_size=512, intermediate_size=2048, num_hidden_layers=layers_a,
                          num_attention_heads=8, num_mel_bins=80, max_source_positions=positions),
        audio_token_id=8, spatial_merge_size=2, vision_feature_layer=-1, projector_hidden_act="gelu", multimodal_projector_bias=False,
    )


def real_inputs(config: Mistral3Config) -> dict[str, list[np.ndarray]]:
    """The shipped calibration images and speech, through the server's preprocessing."""
    size, clip = config.vision_config.image_size, 2 * config.audio_config["max_source_positions"] * 160
    filters = mel_filter_bank(config.audio_config["num_mel_bins"])
    images = sorted((DEFAULT_DIRECTORY / "images").iterdir())[: CALIBRATION + HOLDOUT]
    wavs = sorted((DEFAULT_DIRECTORY / "audio").glob("*.wav"))[: CALIBRATION + HOLDOUT]
    pixels = [image_to_pixels(decode_image(p.read_bytes(), 0, ImageLimits(10**8, 10**8)), (size, size), CLIP_MEAN, CLIP_STD)[None]
              for p in images]
    features = []
    for i, path in enumerate(wavs):
        samples, rate = decode_wav(path.read_bytes(), i, AudioLimits(10**8, 64))
        features.append(audio_to_clips(resample(samples, rate), filters, clip, i, AudioLimits(10**8, 64))[:1])
    return {"pixel_values": pixels, "input_features": features}


def export(config: Mistral3Config, directory: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(config).eval()
    tower, projector = build_audio_modules(config)
    # Only what the recipes read: images up to 224 px in cells of patch x merge, Whisper-style clips.
    facts = SimpleNamespace(
        image=SimpleNamespace(cell=config.vision_config.patch_size * config.spatial_merge_size,
                              longest_edge=config.vision_config.image_size),
        audio=SimpleNamespace(num_mel_bins=config.audio_config["num_mel_bins"],
                              frames=2 * config.audio_config["max_source_positions"]),
    )
    source = SimpleNamespace(model=model, parts={"audio_tower": tower, "audio_projector": projector}, facts=facts)
    paths = {}
    for recipe in (vision_recipe(source, LimitsSpec()), audio_recipe(source, LimitsSpec())):
        out = directory / recipe.component
        out.mkdir()
        paths[recipe.input_names[0]] = export_graph(recipe, out, ExportSpec(parity_samples=1, atol=1e-3, rtol=1e-2)).path
    return paths


def median_ms(sess: ort.InferenceSession, name: str, batch: np.ndarray, runs: int) -> float:
    sess.run(None, {name: batch})  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, {name: batch})
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(fp32: Path, name: str, inputs: list[np.ndarray], workdir: Path, runs: int) -> list[Row]:
    encoder = "vision (ViT-B, 224 px)" if name == "pixel_values" else "audio (Whisper-base)"
    ranges = workdir / f"{name}-ranges.json"
    calibrate(fp32, SampleReader(name, inputs[:CALIBRATION], f"calibrate {name}"), "minmax", ranges)
    variants = {"fp32": fp32}
    for layout in (U8S8, S8S8):
        variants[layout.name] = workdir / f"{name}-{layout.name}.onnx"
        quantize_qdq(fp32, variants[layout.name], layout, "minmax", ranges)
    held = [{name: x} for x in inputs[CALIBRATION:]]
    output = [o.name for o in ort.InferenceSession(str(fp32)).get_outputs()]
    reference = run_onnxruntime(fp32, held, output)
    rows = []
    for variant, path in variants.items():
        sess = ort.InferenceSession(str(path))
        cos = figures(run_onnxruntime(path, held, output), reference, output)[0].cosine
        batch8 = np.concatenate([inputs[i % len(inputs)] for i in range(8)])
        rows.append(Row(encoder, variant, path.stat().st_size / 1e6, median_ms(sess, name, inputs[0], runs),
                        median_ms(sess, name, batch8, max(3, runs // 4)), cos))
    return rows


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoders = list(dict.fromkeys(r.encoder for r in rows))
    fig, axes = plt.subplots(1, len(encoders), figsize=(5 * len(encoders), 3.5))
    for ax, encoder in zip(np.atleast_1d(axes), encoders):
        mine = [r for r in rows if r.encoder == encoder]
        x = np.arange(len(mine))
        ax.bar(x - 0.2, [r.batch1_ms for r in mine], 0.4, label="batch 1")
        ax.bar(x + 0.2, [r.batch8_ms for r in mine], 0.4, label="batch 8")
        ax.set_xticks(x, [f"{r.variant}\ncos {r.cosine:.4f}" for r in mine])
        ax.set_ylabel("median ms")
        ax.set_title(encoder)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small encoders and few runs: a smoke run")
    parser.add_argument("--runs", type=int, help="timed runs at batch 1 (batch 8: a quarter); default 40, quick 5")
    args = parser.parse_args()
    runs = args.runs or (5 if args.quick else 40)
    config = model_config(args.quick)
    inputs = real_inputs(config)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fp32 in export(config, Path(tmp)).items():
            rows += measure(fp32, name, inputs[name], Path(tmp), runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "encoders.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["encoder", "variant", "MB", "batch1_ms", "batch8_ms", "cosine"])
        writer.writerows([r.encoder, r.variant, f"{r.mb:.2f}", f"{r.batch1_ms:.2f}", f"{r.batch8_ms:.2f}", f"{r.cosine:.5f}"]
                         for r in rows)
    plot(rows, RESULTS / "encoders.png")
    fp32 = {r.encoder: r for r in rows if r.variant == "fp32"}
    print(f"\n{'quick smoke run: ' if args.quick else ''}ORT {ort.__version__}, {runs} runs at batch 1\n")
    print("| encoder | graph | size MB (vs FP32) | batch 1 ms | batch 8 ms | speed-up b8 | cosine vs FP32 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        base = fp32[r.encoder]
        print(f"| {r.encoder} | {r.variant} | {r.mb:.1f} ({r.mb / base.mb:.0%}) | {r.batch1_ms:.1f} | {r.batch8_ms:.1f} | "
              f"{base.batch8_ms / r.batch8_ms:.2f}x | {r.cosine:.5f} |")


if __name__ == "__main__":
    main()
