"""MNIST (LeCun, Bottou, Bengio & Haffner 1998): 28x28 grey handwritten digits, labels 0-9.

Read from the four official IDX files (gzip-compressed, as published):

    train-images-idx3-ubyte.gz  60,000 images    t10k-images-idx3-ubyte.gz  10,000 images
    train-labels-idx1-ubyte.gz  60,000 labels    t10k-labels-idx1-ubyte.gz  10,000 labels

IDX layout (big-endian): magic ``0x00000803`` (uint8, 3 dims) for images and ``0x00000801`` (uint8, 1 dim)
for labels, then one int32 per dimension, then the uint8 payload (0 = background, 255 = ink). torchvision's
MNIST reader decodes it (a gzip file is first unpacked to a temporary file, as torchvision's dataset does);
the header is checked here first, so that a wrong or damaged file is refused in one line naming it.

Downloads are md5-checked; a local ``.gz`` file whose md5 is not the published one is used, with a one-line
warning naming the file and the expected md5 (an edited or re-compressed copy trains, but not silently).

``split: train`` trains on the official 60k and tests on t10k. ``split: test`` trains on t10k alone (all an
offline machine may have): a seeded slice is held out for validation, and the test loader serves that same
held-out slice, so no evaluated image was seen in training. Only the t10k files are needed then, and no
download is attempted.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.mnist import read_image_file, read_label_file

from diffusion_lab.data.cache import fingerprint_files
from diffusion_lab.data.download import download_file, file_md5
from diffusion_lab.data.errors import CorruptDataError
from diffusion_lab.data.source import DataSource, Decoded
from diffusion_lab.data.transforms import resize_square, to_channels

log = logging.getLogger(__name__)

__all__ = ["MnistSource", "read_idx", "IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "MNIST_MIRRORS", "MNIST_MD5"]

IDX_IMAGES_MAGIC = 0x00000803  # uint8 data, 3 dimensions (count, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # uint8 data, 1 dimension (count)

# The mirrors torchvision uses, in its order.
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_PREFIX = {"train": "train", "test": "t10k"}


def _unpacked(path: Path, tmp: Path) -> Path:
    """``path`` itself when it is a plain IDX file, else its gunzipped copy in ``tmp`` (told by magic)."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return path
    out = tmp / path.name
    try:
        with gzip.open(path, "rb") as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (EOFError, OSError, zlib.error) as e:
        raise CorruptDataError(
            f"IDX file {path}: gzip stream is truncated or corrupt ({e}); re-download it"
        ) from e
    return out


def _check_header(plain: Path, path: Path, magic: int) -> None:
    """Refuse in one line naming ``path`` what torchvision's reader would answer with an assert or a reshape
    error: wrong magic, truncated header or payload, trailing bytes."""
    size = plain.stat().st_size
    with open(plain, "rb") as f:
        head = f.read(16)
    if len(head) < 4:
        raise CorruptDataError(f"IDX file {path}: only {len(head)} bytes, too short for a header")
    found = int.from_bytes(head[:4], "big")
    if found != magic:
        raise CorruptDataError(
            f"IDX file {path}: wrong magic 0x{found:08x}, expected 0x{magic:08x} "
            f"({'images' if magic == IDX_IMAGES_MAGIC else 'labels'}); is it the right file?"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if size < header:
        raise CorruptDataError(f"IDX file {path}: truncated header ({size} of {header} bytes)")
    shape = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    payload = size - header
    if payload < expected:
        raise CorruptDataError(
            f"IDX file {path}: truncated data, {payload} of {expected} bytes for shape {shape}; "
            "re-download it"
        )
    if payload > expected:
        raise CorruptDataError(
            f"IDX file {path}: {payload - expected} unexpected bytes after the data of shape {shape}"
        )


def read_idx(path: Path | str, magic: int) -> np.ndarray:
    """Read one uint8 IDX file (gzip or plain) with torchvision's MNIST reader.

    Args:
        path: the file.
        magic: expected magic number (``IDX_IMAGES_MAGIC`` or ``IDX_LABELS_MAGIC``).

    Returns:
        uint8 array, (count, rows, cols) for images or (count,) for labels.

    Raises:
        CorruptDataError: wrong magic, truncated header or payload, or trailing bytes (names the file).
    """
    path = Path(path)
    reader = read_image_file if magic == IDX_IMAGES_MAGIC else read_label_file
    with tempfile.TemporaryDirectory(prefix="diffusion_lab-idx-") as tmp:
        plain = _unpacked(path, Path(tmp))
        _check_header(plain, path, magic)
        x = reader(str(plain))  # images (N, 28, 28) uint8; labels (N,) int64
    return x.to(torch.uint8).numpy()


def check_published(path: Path) -> bool:
    """Whether ``path`` is the published MNIST file of its name (md5); warns in one line when it is not.

    Only the published ``.gz`` files have known checksums; other names pass unchecked.
    """
    expected = MNIST_MD5.get(path.name)
    if expected is None:
        return True
    found = file_md5(path)
    if found != expected:
        log.warning(
            "MNIST file %s is not the published one: md5 %s, expected %s; training on it as it is",
            path,
            found,
            expected,
        )
        return False
    return True


def read_mnist_pair(
    images_path: Path, labels_path: Path, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of one split, with the counts cross-checked."""
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise CorruptDataError(
            f"MNIST count mismatch: {images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels; re-download both"
        )
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        raise CorruptDataError(
            f"IDX file {labels_path}: record {bad[0]} has label {labels[bad[0]]}, outside 0-{num_classes - 1}"
        )
    return images, labels


class MnistSource(DataSource):
    """MNIST from the official IDX files in ``root`` (downloaded and md5-verified when enabled)."""

    name = "mnist"
    splits = ("train", "test")
    default_split = "train"
    default_image_size = 28
    default_channels = 1
    downloadable = True
    fixed_num_classes = 10

    def __init__(self, *args, mirrors: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.root is None:
            raise ValueError("dataset 'mnist': dataset.root must name the folder of the IDX files")
        self.mirrors = list(mirrors or MNIST_MIRRORS)
        self._checked: set[Path] = set()

    def plan(self, split: str) -> tuple[str, str | None]:
        self.check_split(split)
        return (split, None) if split == "test" else ("train", "test")

    def files(self, part: str) -> list[Path]:
        p = _PREFIX[part]
        return [self.root / f"{p}-images-idx3-ubyte.gz", self.root / f"{p}-labels-idx1-ubyte.gz"]

    def missing(self, part: str) -> list[Path]:
        # unpacked copies (no .gz) are accepted as well
        return [p for p in self.files(part) if not p.is_file() and not p.with_suffix("").is_file()]

    def _existing(self, part: str) -> list[Path]:
        return [p if p.is_file() else p.with_suffix("") for p in self.files(part)]

    def missing_hint(self, parts: tuple[str, ...]) -> str:
        return "offline with only the t10k files: dataset.split=test" if "train" in parts else ""

    def fetch(self, *parts: str) -> None:
        super().fetch(*parts)
        for path in (p for part in parts for p in self._existing(part)):
            if path not in self._checked:  # once per file: fetch runs again for every part loaded
                self._checked.add(path)
                check_published(path)

    def download_one(self, path: Path) -> None:
        urls = [m.rstrip("/") + "/" + path.name for m in self.mirrors]
        download_file(urls, path, md5=MNIST_MD5.get(path.name))

    def fingerprint(self, part: str) -> str:
        return fingerprint_files(self._existing(part))

    def decode(self, part: str) -> Decoded:
        images_path, labels_path = self._existing(part)
        images, labels = read_mnist_pair(images_path, labels_path)
        x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28)
        x = to_channels(resize_square(x, self.image_size), self.channels)
        y = torch.from_numpy(labels.astype(np.int64))
        return x, y, {"files": [images_path.name, labels_path.name]}
