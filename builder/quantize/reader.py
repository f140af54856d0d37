"""Feeds calibration samples to ONNX Runtime's calibrator, with a progress bar."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from tqdm import tqdm


class SampleReader(CalibrationDataReader):
    """One calibration batch per sample (an image, or an audio file's clips), as the graph's feeds."""

    def __init__(self, samples: Sequence[dict[str, np.ndarray]], label: str, progress: bool = True) -> None:
        self.samples = list(samples)
        self.label = label
        self.progress = progress
        self._bar: tqdm | None = None
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._bar is None:
            self._bar = tqdm(total=len(self.samples), desc=self.label, unit="sample", disable=not self.progress, leave=False)
        if self._next == len(self.samples):
            self._bar.close()
            return None
        sample = self.samples[self._next]
        self._next += 1
        self._bar.update()
        return sample

    def __len__(self) -> int:
        return len(self.samples)

    def rewind(self) -> None:
        self._next = 0
        self._bar = None
