"""Image and audio layouts, one module each, looked up by the name ``ImageFacts.layout`` / ``AudioFacts.layout``
holds (see :mod:`.base` for what a layout answers)."""

from __future__ import annotations

from ..model_facts import AudioFacts, ImageFacts
from .base import AudioLayout, ImageLayout
from .chunked import ChunkedLayout
from .fixed import FixedLayout
from .masked import MaskedLayout
from .pixtral import PixtralLayout
from .qwen_vl import QwenVLLayout
from .windows import WindowsLayout

IMAGE_LAYOUTS: dict[str, type[ImageLayout]] = {"pixtral": PixtralLayout, "fixed": FixedLayout, "qwen_vl": QwenVLLayout}
AUDIO_LAYOUTS: dict[str, type[AudioLayout]] = {"windows": WindowsLayout, "masked": MaskedLayout, "chunked": ChunkedLayout}


def image_layout(image: ImageFacts) -> ImageLayout:
    return IMAGE_LAYOUTS[image.layout](image)


def audio_layout(audio: AudioFacts) -> AudioLayout:
    return AUDIO_LAYOUTS[audio.layout](audio)
