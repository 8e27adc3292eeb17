"""CIFAR-10 (Krizhevsky 2009): 60,000 RGB 32x32 images in 10 classes (50,000 train, 10,000 test).

Read with ``torchvision.datasets.CIFAR10`` from ``root/cifar-10-batches-py`` (which checks each batch's md5).
When missing and ``download`` is on, the published archive is fetched (md5-verified, nothing partial kept)
and unpacked. Random horizontal flips are on by default, as in DDPM's CIFAR-10 training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffusion_lab.data.download import download_file
from diffusion_lab.data.errors import CorruptDataError
from diffusion_lab.data.source import DataSource, Decoded
from diffusion_lab.data.transforms import resize_square, to_channels

__all__ = ["Cifar10Source"]

ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCH_DIR = "cifar-10-batches-py"
CIFAR_MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)
_PART_FILES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)] + ["batches.meta"],
    "test": ["test_batch", "batches.meta"],
}


class Cifar10Source(DataSource):
    """CIFAR-10 through torchvision."""

    name = "cifar10"
    splits = ("train", "test")
    default_split = "train"
    default_image_size = 32
    default_channels = 3
    default_hflip = True
    downloadable = True
    fixed_num_classes = 10

    def __init__(self, *args, mirrors: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.root is None:
            raise ValueError(
                "dataset 'cifar10': dataset.root must name the folder holding cifar-10-batches-py/"
            )
        self.mirrors = list(mirrors or CIFAR_MIRRORS)

    def plan(self, split: str) -> tuple[str, str | None]:
        self.check_split(split)
        return (split, None) if split == "test" else ("train", "test")

    def files(self, part: str) -> list[Path]:
        return [self.root / BATCH_DIR / f for f in _PART_FILES[part]]

    def fetch(self, *parts: str) -> None:
        if any(self.missing(part) for part in parts) and self.download:
            try:
                self._download_and_extract()
            except RuntimeError as e:
                raise RuntimeError(
                    f"dataset 'cifar10': {e}, or point dataset.root= at a folder holding {BATCH_DIR}/"
                ) from e
        super().fetch(*parts)

    def _download_and_extract(self) -> None:
        from torchvision.datasets.utils import extract_archive

        archive = self.root / ARCHIVE
        if not archive.is_file():
            download_file([m.rstrip("/") + "/" + ARCHIVE for m in self.mirrors], archive, md5=ARCHIVE_MD5)
        extract_archive(str(archive), str(self.root))

    def missing_hint(self, parts: tuple[str, ...]) -> str:
        return f"the files of {BATCH_DIR}/ from {ARCHIVE}"

    def decode(self, part: str) -> Decoded:
        from torchvision.datasets import CIFAR10

        try:
            ds = CIFAR10(str(self.root), train=part == "train", download=False)  # checks every batch's md5
        except RuntimeError as e:
            raise CorruptDataError(
                f"dataset 'cifar10': the files in {self.root / BATCH_DIR} fail torchvision's md5 check "
                f"({e}); delete them and set dataset.download=true"
            ) from e
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        x = to_channels(resize_square(x, self.image_size), self.channels)
        return x, torch.tensor(ds.targets, dtype=torch.int64), {"classes": list(ds.classes)}
