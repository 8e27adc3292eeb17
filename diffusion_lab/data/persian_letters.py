"""Hoda handwritten Persian (Farsi) letters: binary scans of isolated letters in 36 classes, CDB 5.0 format.

Collected by Hossein Khosravi with Hoda System Co and Tarbiat Modares University (2010); the format is read by
:mod:`diffusion_lab.data.cdb`.

Published file (public repository XSharifi/Persian-letter-OCR, folder ``Dataset/``):

    Persian-Character-DB-Test.cdb   17,706 records, 460-521 per class except 161 (class 33) and 114 (35)

Classes 0-31 are the 32 letters of the Persian alphabet in order (alef ... ye), then 32 hamze, 33 alef with
madda, 34 he in its medial form and 35 he in its final form (:data:`CLASS_NAMES`, :data:`CLASS_LETTERS`).

The training file of the collection (``Persian-Character-DB-Training.cdb``) has no public source. ``split``:

- ``holdout`` splits the published file in two, stratified by class with a fixed seed (``split_seed``):
  ``test_fraction`` of every class is held out for evaluation, the rest trains (and gives the validation
  slice). The same rows on every machine and every run.
- ``train`` trains on ``Persian-Character-DB-Training.cdb`` placed in ``root`` by hand and evaluates on the
  whole published file.
- ``auto`` (default) is ``train`` when that file is in ``root``, else ``holdout``.

Images are fitted into the image box exactly like the digits (:func:`~diffusion_lab.data.cdb.fit_in_box`:
longer side ``box_fraction * image_size``, aspect ratio kept, centred, ink bright on a dark background).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffusion_lab.data.cache import fingerprint_files
from diffusion_lab.data.cdb import CDB5_FORMAT, CdbRecords, cdb_error, fit_in_box, read_cdb
from diffusion_lab.data.download import download_file, join_url
from diffusion_lab.data.source import DataSource, Decoded
from diffusion_lab.data.transforms import to_channels

__all__ = [
    "PersianLettersSource",
    "stratified_split",
    "CLASS_NAMES",
    "CLASS_LETTERS",
    "LETTERS_TEST_FILE",
    "LETTERS_TEST_MD5",
    "LETTERS_TEST_COUNTS",
    "LETTERS_MIRRORS",
]

# (transliterated name, the letter) of labels 0..35; medial and final he written with the joining tatweel
_CLASSES = (
    ("alef", "\u0627"),
    ("be", "\u0628"),
    ("pe", "\u067e"),
    ("te", "\u062a"),
    ("se", "\u062b"),
    ("jim", "\u062c"),
    ("che", "\u0686"),
    ("he_jimi", "\u062d"),
    ("khe", "\u062e"),
    ("dal", "\u062f"),
    ("zal", "\u0630"),
    ("re", "\u0631"),
    ("ze", "\u0632"),
    ("zhe", "\u0698"),
    ("sin", "\u0633"),
    ("shin", "\u0634"),
    ("sad", "\u0635"),
    ("zad", "\u0636"),
    ("ta", "\u0637"),
    ("za", "\u0638"),
    ("ein", "\u0639"),
    ("ghein", "\u063a"),
    ("fe", "\u0641"),
    ("ghaf", "\u0642"),
    ("kaf", "\u06a9"),
    ("gaf", "\u06af"),
    ("lam", "\u0644"),
    ("mim", "\u0645"),
    ("nun", "\u0646"),
    ("vav", "\u0648"),
    ("he", "\u0647"),
    ("ye", "\u06cc"),
    ("hamze", "\u0621"),
    ("alef_madda", "\u0622"),
    ("he_medial", "\u0640\u0647\u0640"),
    ("he_final", "\u0640\u0647"),
)
CLASS_NAMES = tuple(name for name, _ in _CLASSES)  # ASCII, for file names, grids and loggers
CLASS_LETTERS = tuple(letter for _, letter in _CLASSES)  # the Persian letters themselves
NUM_LETTERS = len(_CLASSES)

LETTERS_TEST_FILE = "Persian-Character-DB-Test.cdb"
LETTERS_TRAIN_FILE = "Persian-Character-DB-Training.cdb"
LETTERS_TEST_MD5 = "949ab365f2ec5d6ffdc3fc372fc4bf5f"
# fmt: off
LETTERS_TEST_COUNTS = (
    520, 519, 519, 520, 462, 519, 496, 521, 519, 520, 460, 520, 520, 519, 520, 520, 520, 520, 518, 481,
    520, 520, 519, 519, 520, 520, 520, 520, 520, 520, 520, 520, 507, 161, 473, 114,
)
# fmt: on
_REPO = "https://raw.githubusercontent.com/XSharifi/Persian-letter-OCR"
# the commit that added the file (its bytes can never change there), then the default branch
LETTERS_MIRRORS = (
    f"{_REPO}/bd2269679c7c30836486b1f021f491590122e85b/Dataset/",
    f"{_REPO}/master/Dataset/",
)
_FILE_OF_PART = {
    "holdout_train": LETTERS_TEST_FILE,
    "holdout_test": LETTERS_TEST_FILE,
    "test": LETTERS_TEST_FILE,
    "train": LETTERS_TRAIN_FILE,
}


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train rows, test rows) of ``labels`` (N,), each sorted, holding out a share of every class.

    Class c with n_c rows gives ``round(test_fraction * n_c)`` test rows, at least one and at most n_c - 1
    (classes of one row train). The rows are those first in a permutation of the class's rows drawn from
    ``torch.Generator().manual_seed(seed + c)``, so every class's choice is fixed by the seed alone.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    test = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n_test = min(max(1, round(test_fraction * len(rows))), len(rows) - 1)
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + int(c))).numpy()
        test.append(rows[perm[:n_test]])
    test_rows = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[test_rows] = False
    return np.flatnonzero(mask), test_rows


class PersianLettersSource(DataSource):
    """Hoda Persian letters from the CDB 5.0 files in ``root`` (the published one downloaded when enabled)."""

    name = "persian_letters"
    splits = ("auto", "holdout", "train")
    default_split = "auto"
    default_image_size = 32
    default_channels = 1
    downloadable = True
    fixed_num_classes = NUM_LETTERS

    def __init__(
        self,
        *args,
        mirrors: list[str] | None = None,
        box_fraction: float = 0.8,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if self.root is None:
            raise ValueError("dataset 'persian_letters': dataset.root must name the folder of the .cdb file")
        if not 0 < box_fraction <= 1:
            raise ValueError(
                f"dataset 'persian_letters': box_fraction must lie in (0, 1], got {box_fraction}"
            )
        if not 0 < test_fraction < 1:
            raise ValueError(
                f"dataset 'persian_letters': test_fraction must lie in (0, 1), got {test_fraction}"
            )
        self.mirrors = list(mirrors or LETTERS_MIRRORS)
        self.box_fraction = float(box_fraction)
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self._decoded: tuple[str, Tensor, Tensor, CdbRecords] | None = None

    def options(self) -> dict:
        return {
            "box_fraction": self.box_fraction,
            "test_fraction": self.test_fraction,
            "seed": self.split_seed,
        }

    def class_names(self) -> list[str]:
        return list(CLASS_NAMES)

    def plan(self, split: str) -> tuple[str, str | None]:
        self.check_split(split)
        if split == "auto":
            split = "train" if (self.root / LETTERS_TRAIN_FILE).is_file() else "holdout"
        return ("train", "test") if split == "train" else ("holdout_train", "holdout_test")

    def files(self, part: str) -> list[Path]:
        return [self.root / _FILE_OF_PART[part]]

    def missing_hint(self, parts: tuple[str, ...]) -> str:
        if "train" in parts:
            return f"{LETTERS_TRAIN_FILE} has no public source; without it use dataset.split=holdout"
        return ""

    def download_one(self, path: Path) -> None:
        if path.name != LETTERS_TEST_FILE:
            raise RuntimeError(f"no public source of '{path.name}' to download")
        urls = [join_url(m, path.name) for m in self.mirrors]
        download_file(
            urls,
            path,
            md5=LETTERS_TEST_MD5,
            validate=lambda tmp: self._check(read_cdb(tmp, fmt=CDB5_FORMAT), published=True),
        )

    @staticmethod
    def _check(records: CdbRecords, published: bool) -> None:
        """Labels below 36; for the published file also its record count and per-class counts."""
        bad = np.flatnonzero(records.labels >= NUM_LETTERS)
        if bad.size:
            i = int(bad[0])
            raise cdb_error(records.path, f"record {i} has label {records.labels[i]}, outside 0-35")
        if not published:
            return
        if len(records) != sum(LETTERS_TEST_COUNTS):
            raise cdb_error(
                records.path,
                f"record count mismatch: {len(records)} records, expected {sum(LETTERS_TEST_COUNTS)} "
                f"({LETTERS_TEST_FILE})",
            )
        hist = np.bincount(records.labels, minlength=NUM_LETTERS)
        if tuple(hist.tolist()) != LETTERS_TEST_COUNTS:
            c = int(np.flatnonzero(hist != np.asarray(LETTERS_TEST_COUNTS))[0])
            raise cdb_error(
                records.path,
                f"per-class counts differ from {LETTERS_TEST_FILE}'s (class {c}: {hist[c]} records, "
                f"expected {LETTERS_TEST_COUNTS[c]})",
            )

    def _decode_file(self, path: Path) -> tuple[Tensor, Tensor, CdbRecords]:
        """(uint8 (N, C, S, S), int64 (N,), records) of one file, kept for the other part of the holdout."""
        key = fingerprint_files([path])
        if self._decoded is None or self._decoded[0] != key:
            records = read_cdb(path, fmt=CDB5_FORMAT)
            self._check(records, published=path.name == LETTERS_TEST_FILE)
            x = to_channels(fit_in_box(records, self.image_size, self.box_fraction), self.channels)
            self._decoded = (key, x, torch.from_numpy(records.labels), records)
        return self._decoded[1:]

    def decode(self, part: str) -> Decoded:
        path = self.files(part)[0]
        x, y, records = self._decode_file(path)
        meta = {"file": path.name, "comment": records.header.comment}
        if part not in ("holdout_train", "holdout_test"):
            return x, y, meta
        train_rows, test_rows = stratified_split(records.labels, self.test_fraction, self.split_seed)
        rows = torch.from_numpy(train_rows if part == "holdout_train" else test_rows)
        return x[rows], y[rows], {**meta, "rows": len(rows), "of": len(records)}
