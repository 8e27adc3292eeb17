"""Hoda handwritten Persian (Farsi) digits (Khosravi & Kabir 2007), 102,352 binary scans, labels 0-9.

The three original ``.cdb`` files (public repository amir-saniyan/HodaDatasetReader, folder ``DigitDB/``):

    Train 60000.cdb        60,000 records, 6,000 per class
    Test 20000.cdb         20,000 records, 2,000 per class
    RemainingSamples.cdb   22,352 records, 1,923 to 2,371 per class

The CDB format (a 1024-byte header, then run-length coded records) is read by :mod:`diffusion_lab.data.cdb`,
which also reads the letters' CDB 5.0. The 42,352 records available offline decode in well under a second.
Each image is then scaled to fit a ``box_fraction * image_size`` box keeping its aspect ratio (like MNIST's
20-in-28 digits) and centred on a dark canvas, ink bright (255) as in MNIST.

``split: auto`` trains on ``Train 60000.cdb`` when present, else on ``RemainingSamples.cdb`` when present,
else downloads ``Train 60000.cdb`` (when enabled). Evaluation always uses ``Test 20000.cdb``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffusion_lab.data.cdb import (
    DIGITS_FORMAT,
    CdbHeader,
    CdbRecords,
    cdb_error,
    fit_in_box,
    read_cdb,
    read_cdb_header,
)
from diffusion_lab.data.download import download_file, join_url
from diffusion_lab.data.source import DataSource, Decoded
from diffusion_lab.data.transforms import to_channels

__all__ = [
    "CdbHeader",
    "CdbRecords",
    "read_cdb",
    "read_cdb_header",
    "fit_in_box",
    "PersianSource",
    "HODA_FILES",
]

HODA_BASE_URL = "https://raw.githubusercontent.com/amir-saniyan/HodaDatasetReader/master/DigitDB/"
# part -> (file name, md5 or None when not published, record count, per-class count or None)
HODA_FILES = {
    "train": ("Train 60000.cdb", None, 60000, 6000),
    "test": ("Test 20000.cdb", "81b038f2151182e42ab728f2c232afde", 20000, 2000),
    "remaining": ("RemainingSamples.cdb", "20c50a7fec6cc9002f2a87166923a5a8", 22352, None),
}
NUM_DIGITS = 10


class PersianSource(DataSource):
    """Hoda Persian digits from the original ``.cdb`` files in ``root`` (downloaded when enabled)."""

    name = "persian"
    splits = ("auto", "train", "remaining", "test")
    default_split = "auto"
    default_image_size = 32
    default_channels = 1
    downloadable = True
    fixed_num_classes = NUM_DIGITS

    def __init__(self, *args, mirrors: list[str] | None = None, box_fraction: float = 0.8, **kwargs):
        super().__init__(*args, **kwargs)
        if self.root is None:
            raise ValueError("dataset 'persian': dataset.root must name the folder of the .cdb files")
        if not 0 < box_fraction <= 1:
            raise ValueError(f"dataset 'persian': box_fraction must lie in (0, 1], got {box_fraction}")
        self.mirrors = list(mirrors or [HODA_BASE_URL])
        self.box_fraction = float(box_fraction)

    def options(self) -> dict:
        return {"box_fraction": self.box_fraction}

    def plan(self, split: str) -> tuple[str, str | None]:
        self.check_split(split)
        if split == "test":
            return "test", None
        if split == "auto":
            present = {part: (self.root / HODA_FILES[part][0]).is_file() for part in ("train", "remaining")}
            split = "remaining" if present["remaining"] and not present["train"] else "train"
        return split, "test"

    def files(self, part: str) -> list[Path]:
        return [self.root / HODA_FILES[part][0]]

    def missing_hint(self, parts: tuple[str, ...]) -> str:
        if "train" in parts:
            return "offline, RemainingSamples.cdb + Test 20000.cdb also work: dataset.split=auto or remaining"
        return ""

    def download_one(self, path: Path) -> None:
        part = next(p for p, spec in HODA_FILES.items() if spec[0] == path.name)
        _, md5, count, _ = HODA_FILES[part]
        urls = [join_url(m, path.name) for m in self.mirrors]
        download_file(
            urls,
            path,
            md5=md5,
            validate=lambda tmp: self._check_counts(read_cdb(tmp, count, DIGITS_FORMAT), part),
        )

    @staticmethod
    def _check_counts(records: CdbRecords, part: str) -> None:
        name, _, count, per_class = HODA_FILES[part]
        if len(records) != count:
            raise cdb_error(
                records.path, f"record count mismatch: {len(records)} records, expected {count} ({name})"
            )
        hist = np.bincount(records.labels, minlength=NUM_DIGITS)
        if len(hist) > NUM_DIGITS:
            i = int(np.flatnonzero(records.labels >= NUM_DIGITS)[0])
            raise cdb_error(records.path, f"record {i} has label {records.labels[i]}, outside 0-9")
        if per_class is not None and not (hist == per_class).all():
            raise cdb_error(
                records.path, f"per-class counts {hist.tolist()}, expected {per_class} each ({name})"
            )

    def decode(self, part: str) -> Decoded:
        path = self.files(part)[0]
        records = read_cdb(path, HODA_FILES[part][2], DIGITS_FORMAT)
        self._check_counts(records, part)
        x = to_channels(fit_in_box(records, self.image_size, self.box_fraction), self.channels)
        return x, torch.from_numpy(records.labels), {"file": path.name, "comment": records.header.comment}
