"""Decode untrusted PNG/JPEG bytes and turn them into Pixtral pixel values (numpy + Pillow only).

``image_to_pixels`` reproduces HF ``PixtralImageProcessorPil`` bit for bit when that processor
is asked for a ``size x size`` output: RGB conversion (transparency composited on white), Pillow
bicubic resize of the uint8 image, ``* (1/255)`` in float64 cast to float32, then float32 normalize.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from builder.runtime.errors import RequestError

ACCEPTED_FORMATS = ("PNG", "JPEG")

# What Pillow raises on malformed or truncated data (zlib/struct problems surface as these too).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int  # width * height, checked on the header before any pixel is decoded


def decode_image(data: bytes, index: int, limits: ImageLimits) -> Image.Image:
    """Fully decode one PNG/JPEG image into an RGB ``PIL.Image``; any client problem is a RequestError."""
    name = f"image[{index}]"
    if len(data) == 0:
        raise RequestError(f"{name}: empty (0 bytes); send a PNG or JPEG image")
    if len(data) > limits.max_bytes:
        raise RequestError(f"{name}: {len(data)} bytes is over the limit of {limits.max_bytes} bytes")
    try:
        # Lazy: parses the header only. Pillow itself raises DecompressionBombError here for
        # images over 2 * Image.MAX_IMAGE_PIXELS, before our (usually lower) limit is checked.
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise RequestError(f"{name}: too many pixels, the limit is {limits.max_pixels} ({e})") from None
    except Image.UnidentifiedImageError:  # its message embeds an object repr, so say it plainly
        raise RequestError(f"{name}: not a PNG or JPEG image (cannot identify image file)") from None
    except _DECODE_ERRORS as e:
        raise RequestError(f"{name}: corrupt or truncated image header ({e})") from None
    if img.format not in ACCEPTED_FORMATS:
        raise RequestError(f"{name}: {img.format} images are not accepted; send PNG or JPEG")
    width, height = img.size
    if width * height > limits.max_pixels:
        raise RequestError(
            f"{name}: {width}x{height} = {width * height} pixels is over the limit of {limits.max_pixels} pixels"
        )
    try:
        img.load()  # force the full decode so truncated/corrupt files fail here, not later
        return _to_rgb(img)
    except _DECODE_ERRORS as e:
        raise RequestError(f"{name}: corrupt or truncated {img.format} image ({e})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Same as ``transformers.image_transforms.convert_to_rgb``: transparency is composited on white."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def image_to_pixels(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Resize to ``size x size`` (bicubic, aspect ratio not kept), rescale and normalize: float32 [3, size, size]."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    # Pillow resizes the uint8 image (its own rounding and [0, 255] clipping), as the HF PIL backend does.
    resized = np.asarray(img.resize((size, size), resample=Image.Resampling.BICUBIC))
    # HF order and dtypes exactly: float64 rescale cast to float32, then normalize in float32.
    scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    pixels = (scaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))
