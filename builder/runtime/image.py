"""Decode untrusted PNG/JPEG bytes and turn them into pixel values (numpy + Pillow only).

Reproduces HF ``PixtralImageProcessorPil`` (and ``Gemma3ImageProcessorPil``) bit for bit: the size from
``resized_size`` (aspect ratio kept, longest edge scaled down, sides rounded up to whole placeholder cells; Gemma:
one fixed square), RGB conversion (transparency composited on white), Pillow bicubic (Gemma: bilinear) resize of
the uint8 image, ``* (1/255)`` in float64 cast to float32, float32 normalize; a batch zero-padded bottom/right to
its largest image.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import RequestError

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


def resized_size(height: int, width: int, longest_edge: int, cell: int) -> tuple[int, int]:
    """HF's ``get_resize_output_image_size``: (height, width) after the resize, multiples of ``cell``."""
    ratio = max(height / longest_edge, width / longest_edge)
    if ratio > 1:  # HF floors (not rounds) so the result never exceeds the longest edge
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    return ((height - 1) // cell + 1) * cell, ((width - 1) // cell + 1) * cell


def smart_resize(height: int, width: int, cell: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's ``smart_resize``: each side rounded (half to even, Python's ``round``) to whole cells, then scaled
    as a whole so the area lies within ``min_pixels``..``max_pixels``; (0, 0) for an aspect ratio over 200."""
    if max(height, width) / min(height, width) > 200:
        return 0, 0
    h, w = round(height / cell) * cell, round(width / cell) * cell
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(cell, math.floor(height / beta / cell) * cell), max(cell, math.floor(width / beta / cell) * cell)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / cell) * cell, math.ceil(width * beta / cell) * cell
    return h, w


RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def image_to_pixels(img: Image.Image, size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                    resample: str = "bicubic") -> np.ndarray:
    """Resize to ``size`` = (height, width) with ``resample``, rescale and normalize: float32 [3, height, width]."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    height, width = size
    # Pillow resizes the uint8 image (its own rounding and [0, 255] clipping), as the HF PIL backend does.
    resized = np.asarray(img.resize((width, height), resample=RESAMPLE[resample]))
    # HF order and dtypes exactly: float64 rescale cast to float32, then normalize in float32.
    scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    pixels = (scaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def pad_images(images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """[3, h, w] images -> ([N, 3, Hmax, Wmax] zero-padded bottom/right, [N, 2] int64 sizes), as HF batches them."""
    sizes = np.array([image.shape[1:] for image in images], dtype=np.int64).reshape(-1, 2)
    batch = np.zeros((len(images), 3, *sizes.max(axis=0)), dtype=np.float32)
    for i, image in enumerate(images):
        batch[i, :, : image.shape[1], : image.shape[2]] = image
    return batch, sizes
