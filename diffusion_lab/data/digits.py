"""scikit-learn's bundled handwritten digits (the UCI optical digits test set): 1,797 images, 8x8, 10 classes.

Each pixel counts the ink in a 4x4 block of the 32x32 scan (0-16, ink bright). No download: the file ships
with scikit-learn. Images are upsampled (bicubic) to ``image_size`` (default 16) and rescaled to 0-255.
Small and fast, it is the default dataset of ``make train``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusion_lab.data.cache import fingerprint_files
from diffusion_lab.data.source import DataSource, Decoded
from diffusion_lab.data.transforms import to_channels
from diffusion_lab.utils.media import to_uint8

__all__ = ["DigitsSource", "DIGITS_COUNT"]

DIGITS_COUNT = 1797
_MAX_VALUE = 16.0


def _bundled_file() -> Path | None:
    """The digits CSV inside the installed scikit-learn (located without importing it)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


class DigitsSource(DataSource):
    """The 8x8 digits of ``sklearn.datasets.load_digits``, upsampled."""

    name = "digits"
    splits = ("all",)
    default_split = "all"
    default_image_size = 16
    default_channels = 1
    fixed_num_classes = 10

    def files(self, part: str) -> list[Path]:
        path = _bundled_file()
        return [path] if path is not None else []

    def fetch(self, *parts: str) -> None:
        if _bundled_file() is None:
            raise ModuleNotFoundError(
                "dataset 'digits' needs scikit-learn's bundled digits.csv.gz; "
                "install scikit-learn (pip install scikit-learn)"
            )

    def fingerprint(self, part: str) -> str:
        return fingerprint_files(self.files(part))

    def decode(self, part: str) -> Decoded:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)  # (1797, 64) float 0..16, (1797,)
        x = torch.from_numpy(images).float().view(-1, 1, 8, 8) * (255.0 / _MAX_VALUE)
        size = self.image_size
        if size != 8:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=size < 8)
        x = to_channels(to_uint8(x, value_range=(0, 255)), self.channels)
        return x, torch.from_numpy(labels).long(), {"source": "sklearn.datasets.load_digits"}
