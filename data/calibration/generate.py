"""Regenerates the committed calibration set in this directory (run by hand; the build only reads it).

    pip install scikit-image && apt-get install espeak-ng sox
    python data/calibration/generate.py

- ``images/``: photographs that scikit-image ships inside its wheel (``skimage/data``), each
  public domain or CC0 according to its ``skimage.data`` docstring (quoted in ``LICENSES.md``),
  downscaled so the longer side is 320 px and saved as JPEG (grey ones stay grey, one stays PNG):
  the server's own decoder and resize are what calibration exercises.
- ``audio/``: English sentences spoken by Debian's ``espeak-ng`` with different voices and speeds,
  saved at different sample rates (8, 11.025, 16, 22.05 kHz; 16-bit mono) so the server's
  resampler is exercised. Their text is in ``audio/transcripts.txt``.
- ``prompts.txt``: text prompts (the LLM's held-out inputs).

Files are named ``NN-*``: the build takes them in name order, the first ``calibration.samples`` to
calibrate and the next ``calibration.holdout`` for the accuracy gate, so held-out photos and
sentences are different photos and sentences, not crops or copies of calibration ones.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

HERE = Path(__file__).resolve().parent
LONGER_SIDE = 320

# (name, loader, license line from its skimage.data docstring)
PHOTOS = [
    ("astronaut", data.astronaut, "NASA Great Images database; no known copyright restrictions, public domain"),
    ("coffee", data.coffee, "CC0 by the photographer (Rachel Michetti)"),
    ("rocket", data.rocket, "SpaceX photo released into the public domain"),
    ("hubble", data.hubble_deep_field, "NASA; may be freely used in the public domain"),
    ("grass", data.grass, "CC0 (Creative Commons CC0 License)"),
    ("brick", data.brick, "CC0Textures, Creative Commons CC0 License"),
    ("ihc", data.immunohistochemistry, "no known copyright restrictions"),
    ("camera", data.camera, "CC0 by the photographer (Lav Varshney)"),
    # held out (the default spec's 8 calibration + 4 hold-out samples)
    ("chelsea", data.chelsea, "CC0 by the photographer (Stefan van der Walt)"),
    ("retina", data.retina, "Creative Commons CC0 1.0 Public Domain Dedication"),
    ("gravel", data.gravel, "CC0Textures, Creative Commons CC0 License"),
    ("coins", data.coins, "no known copyright restrictions"),
]
PNG_PHOTOS = {"coins"}

# (text, espeak-ng voice, words per minute, sample rate of the saved file)
SENTENCES = [
    ("The quick brown fox jumps over the lazy dog.", "en-us", 160, 16000),
    ("Please describe what you see in this picture.", "en-gb", 150, 22050),
    ("A cup of coffee sits on a wooden table.", "en-us+f3", 170, 11025),
    ("The rocket lifted off into a clear blue sky.", "en-gb-scotland", 155, 16000),
    ("How many coins are lying on the table?", "en-029", 165, 8000),
    ("Turn left at the second traffic light.", "en-us+m3", 180, 22050),
    ("Summarise the meeting notes in three lines.", "en-gb-x-rp", 145, 16000),
    ("It will rain tomorrow in the afternoon.", "en-us+f2", 175, 11025),
    # held out
    ("The cat is sleeping next to the window.", "en-gb+f4", 160, 16000),
    ("What time does the train leave for Paris?", "en-us", 150, 22050),
    ("Gravel crunched under the heavy boots.", "en-gb-x-gbclan", 170, 8000),
    ("Read the numbers slowly, one by one.", "en-us+m2", 140, 11025),
]

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain how a bicycle stays upright.",
    "List three uses of a paper clip.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What is two plus two?",
    # held out
    "Describe the smell of rain.",
    "Who wrote the play Hamlet?",
    "Suggest a name for a small grey cat.",
    "How far away is the moon?",
]


def write_images(directory: Path) -> list[str]:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    notes = []
    for index, (name, load, license_line) in enumerate(PHOTOS):
        pixels = np.asarray(load())
        img = Image.fromarray(pixels if pixels.dtype == np.uint8 else (pixels * 255).astype(np.uint8))
        scale = LONGER_SIDE / max(img.size)
        if scale < 1:
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
        path = directory / f"{index:02d}-{name}.{'png' if name in PNG_PHOTOS else 'jpg'}"
        img.save(path, optimize=True) if path.suffix == ".png" else img.save(path, quality=85, optimize=True)
        notes.append(f"- `images/{path.name}`: scikit-image `skimage.data.{load.__name__}`: {license_line}")
    return notes


def write_audio(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (text, voice, wpm, rate) in enumerate(SENTENCES):
            raw = Path(tmp) / "raw.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(raw), text], check=True)
            path = directory / f"{index:02d}-{voice}.wav"
            subprocess.run(["sox", "-D", str(raw), "-r", str(rate), "-c", "1", "-b", "16", str(path), "gain", "-n", "-1"], check=True)
            lines.append(f"{path.name}\t{text}")
    (directory / "transcripts.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    notes = write_images(HERE / "images")
    write_audio(HERE / "audio")
    (HERE / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (HERE / "LICENSES.md").write_text(
        "# Calibration data: sources and licenses\n\nGenerated by `generate.py`.\n\n"
        + "\n".join(notes)
        + "\n- `audio/*.wav`: synthesised with espeak-ng (GPL-3.0 program; its output speech is not covered "
        "by the program's license) from sentences written for this project; `prompts.txt`: written for this project.\n"
    )
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"calibration set written to {HERE}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
