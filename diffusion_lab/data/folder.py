"""Any folder of PNG / JPEG images (searched recursively), resized and centre-cropped to a square.

Labels (``labels`` setting):

- ``none``:   every image is class 0 (``num_classes`` 1).
- ``subdir``: the first-level sub-folder names the class (``root/<class>/.../img.png``); classes are the
  sorted folder names (numerically when all are integers) mapped to 0..K-1.
- ``prefix``: the integer before the first ``.``, ``_`` or ``-`` of the file name is the label
  (``<label>.<n>.png``, the layout of the Persian handwritten letters collections); ``num_classes`` is the
  largest label + 1.

Channels: 1 (grey) or 3 (RGB) converts every image; null keeps the files' own and refuses a mix.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from diffusion_lab.data.errors import CorruptDataError, MissingDataError
from diffusion_lab.data.source import DataSource, Decoded

__all__ = ["FolderSource", "list_images", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
LABEL_MODES = ("none", "subdir", "prefix")
_PREFIX = re.compile(r"^(\d+)(?:[._-]|$)")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def list_images(root: Path) -> list[Path]:
    """Every PNG / JPEG under ``root`` (recursive, hidden entries skipped), sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            Path(dirpath) / f
            for f in filenames
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _natural_channels(mode: str) -> int:
    return 1 if mode in _GREY_MODES else 3


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert to "L" or "RGB"; 16/32-bit grey is rescaled to 8 bits rather than clipped."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")
    if img.mode in ("P", "PA", "LA", "RGBA") and channels == 3:
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (0, 0, 0, 255))  # transparent pixels become black
        img = Image.alpha_composite(canvas, img)
    return img.convert("L" if channels == 1 else "RGB")


class FolderSource(DataSource):
    """Images from a folder tree; see the module docstring for labels and channels."""

    name = "folder"
    splits = ("all",)
    default_split = "all"
    default_image_size = 32
    default_channels = 3

    def __init__(self, *args, labels: str = "none", **kwargs):
        super().__init__(*args, **kwargs)
        if self.root is None:
            raise ValueError("dataset 'folder': set dataset.root=<folder of PNG/JPEG images>")
        if labels not in LABEL_MODES:
            raise ValueError(f"dataset 'folder': labels must be one of {list(LABEL_MODES)}, got '{labels}'")
        self.labels = labels
        self._files: list[Path] | None = None

    def options(self) -> dict[str, Any]:
        # channels null (the files' own, a mix refused) and 3 (all converted) decode a mix differently
        return {"labels": self.labels, "channels": self._channels}

    # -- listing (cheap, no decoding) ------------------------------------------------------------------------

    def image_files(self) -> list[Path]:
        if self._files is None:
            if not self.root.is_dir():
                raise MissingDataError(
                    f"dataset 'folder': root {self.root} is not a folder; point dataset.root= at a folder of "
                    "PNG/JPEG images"
                )
            files = list_images(self.root)
            if not files:
                raise MissingDataError(
                    f"dataset 'folder': no PNG/JPEG images ({', '.join(IMAGE_EXTENSIONS)}) under "
                    f"{self.root}; point dataset.root= at a folder holding them"
                )
            self._files = files
        return self._files

    def files(self, part: str) -> list[Path]:
        return self.image_files()

    def fetch(self, *parts: str) -> None:
        self.image_files()

    def fingerprint(self, part: str) -> str:
        """Relative path, size and mtime of every image (content hashing thousands of files would be slow)."""
        h = hashlib.md5(usedforsecurity=False)
        for p in self.image_files():
            st = p.stat()
            h.update(f"{p.relative_to(self.root).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    @property
    def channels(self) -> int:
        if self._channels is not None:
            return self._channels
        first = self.image_files()[0]
        with self._open(first) as img:
            return _natural_channels(img.mode)

    def class_names(self) -> list[str]:
        """Sorted class folder names (``labels: subdir``)."""
        names = {
            p.relative_to(self.root).parts[0]
            for p in self.image_files()
            if len(p.relative_to(self.root).parts) > 1
        }
        return sorted(names, key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s))

    def labels_of(self, files: list[Path]) -> np.ndarray:
        """(N,) int64 labels of ``files`` under the configured mode."""
        if self.labels == "none":
            return np.zeros(len(files), dtype=np.int64)
        if self.labels == "subdir":
            index = {name: i for i, name in enumerate(self.class_names())}
            out = []
            for p in files:
                parts = p.relative_to(self.root).parts
                if len(parts) < 2:
                    raise ValueError(
                        f"dataset 'folder': {p} is not inside a class sub-folder of {self.root} "
                        "(labels: subdir); move it into one or use dataset.labels=none"
                    )
                out.append(index[parts[0]])
            return np.asarray(out, dtype=np.int64)
        out = []
        for p in files:
            m = _PREFIX.match(p.name)
            if m is None:
                raise ValueError(
                    f"dataset 'folder': file name {p.name} ({p.parent}) has no numeric label prefix "
                    "(expected <label>.<n>.png for labels: prefix); rename it or use dataset.labels=none"
                )
            out.append(int(m.group(1)))
        return np.asarray(out, dtype=np.int64)

    @property
    def num_classes(self) -> int:
        if self.labels == "none":
            return 1
        if self.labels == "subdir":
            return len(self.class_names())
        return int(self.labels_of(self.image_files()).max()) + 1

    # -- decoding --------------------------------------------------------------------------------------------

    def _open(self, path: Path) -> Image.Image:
        try:
            if path.stat().st_size == 0:
                raise CorruptDataError(
                    f"dataset 'folder': image {path} is empty (0 bytes); remove or replace it"
                )
            return Image.open(path)
        except (UnidentifiedImageError, OSError) as e:
            raise CorruptDataError(
                f"dataset 'folder': cannot read image {path} ({e}); remove or replace it"
            ) from e

    def decode(self, part: str) -> Decoded:
        files = self.image_files()
        labels = self.labels_of(files)
        size = self.image_size
        forced = self._channels
        images, first_of = [], {}
        for path in files:
            with self._open(path) as img:
                try:
                    img.load()
                except (OSError, ValueError, SyntaxError) as e:
                    raise CorruptDataError(
                        f"dataset 'folder': cannot decode image {path} ({e}); remove or replace it"
                    ) from e
                if img.width == 0 or img.height == 0:
                    raise CorruptDataError(
                        f"dataset 'folder': image {path} has zero size; remove or replace it"
                    )
                c = _natural_channels(img.mode)
                first_of.setdefault(c, path)
                if forced is None and len(first_of) > 1:
                    raise ValueError(
                        f"dataset 'folder': mixed channel counts, {first_of[1]} is grey but {first_of[3]} "
                        "is colour; set dataset.channels=1 or 3 to convert all"
                    )
                img = _to_mode(img, forced or c)
                img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
                a = np.asarray(img, dtype=np.uint8)
            images.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        x = torch.from_numpy(np.stack(images))  # (N, C, size, size)
        meta = {"labels": self.labels, "classes": self.class_names() if self.labels == "subdir" else None}
        return x, torch.from_numpy(labels), meta
