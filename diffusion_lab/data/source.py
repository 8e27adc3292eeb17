"""The interface every dataset implements, so that one DataModule serves them all.

A *source* knows, for one dataset on disk:

- which stored **parts** exist (e.g. MNIST "train" and "test", Hoda "train", "test" and "remaining"),
- which part trains and which evaluates for a given ``split`` setting (:meth:`DataSource.plan`),
- the files of each part, how to fetch them (:meth:`DataSource.fetch`) and decode them
  (:meth:`DataSource.decode`) into uint8 images (N, C, H, W) and int64 labels (N,).

Construction never touches the disk beyond cheap listings, so ``image_size``, ``channels`` and
``num_classes`` are known before any data is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

from diffusion_lab.data.cache import fingerprint_files
from diffusion_lab.data.errors import missing_files_error

__all__ = ["DataSource", "Decoded"]

# images uint8 (N, C, H, W), labels int64 (N,), meta (JSON-able dict stored with the cache entry)
Decoded = tuple[Tensor, Tensor, dict[str, Any]]


class DataSource:
    """Base class: subclasses set the class attributes and implement :meth:`files` and :meth:`decode`."""

    name: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ("all",)  # values accepted for the ``split`` setting
    default_split: ClassVar[str] = "all"
    default_image_size: ClassVar[int] = 32
    default_channels: ClassVar[int] = 1
    default_hflip: ClassVar[bool] = False
    downloadable: ClassVar[bool] = False
    fixed_num_classes: ClassVar[int | None] = None

    def __init__(
        self,
        root: str | Path | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        download: bool = False,
    ):
        self.root = Path(root).expanduser() if root is not None else None
        self.image_size = int(image_size or self.default_image_size)
        if self.image_size < 1:
            raise ValueError(
                f"dataset '{self.name}': image_size must be a positive integer, got {image_size}"
            )
        if channels is not None and channels not in (1, 3):
            raise ValueError(
                f"dataset '{self.name}': channels must be 1 or 3 (or null to infer), got {channels}"
            )
        self._channels = channels
        self.download = bool(download)

    # -- static facts ----------------------------------------------------------------------------------------

    @property
    def channels(self) -> int:
        return self._channels or self.default_channels

    @property
    def num_classes(self) -> int:
        if self.fixed_num_classes is None:
            raise NotImplementedError
        return self.fixed_num_classes

    def class_names(self) -> list[str]:
        """Display names of the classes 0, 1, ... (empty: none, the label numbers serve)."""
        return []

    def options(self) -> dict[str, Any]:
        """Settings besides size and channels that change the decoded content (they enter the cache key)."""
        return {}

    # -- which part is used for what -------------------------------------------------------------------------

    def plan(self, split: str) -> tuple[str, str | None]:
        """(part to train on, part to test on); a test part of None means "the held-out validation slice"."""
        self.check_split(split)
        return split, None

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(
                f"dataset '{self.name}': split must be one of {list(self.splits)}, got '{split}'"
            )

    # -- files -----------------------------------------------------------------------------------------------

    def files(self, part: str) -> list[Path]:
        """The files that make up ``part``."""
        raise NotImplementedError

    def missing(self, part: str) -> list[Path]:
        return [p for p in self.files(part) if not p.is_file()]

    def missing_hint(self, parts: tuple[str, ...]) -> str:
        """An extra remedy for the missing-files message (e.g. an offline alternative)."""
        return ""

    def fetch(self, *parts: str) -> None:
        """Make sure every file of ``parts`` is on disk: download when enabled, else raise MissingDataError.

        The error lists the missing files of all the given parts at once.
        """
        missing = list(dict.fromkeys(p for part in parts for p in self.missing(part)))
        if not missing:
            return
        if not (self.download and self.downloadable):
            raise missing_files_error(
                self.name,
                self.root,
                [self._rel(p) for p in missing],
                self.downloadable,
                self.missing_hint(parts),
            )
        for path in missing:
            try:
                self.download_one(path)
            except RuntimeError as e:
                hint = self.missing_hint(parts)
                raise RuntimeError(
                    f"dataset '{self.name}': {e}, or point dataset.root= at a folder holding it"
                    + (f" ({hint})" if hint else "")
                ) from e

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() if self.root is not None else path.name

    def download_one(self, path: Path) -> None:
        raise NotImplementedError

    def fingerprint(self, part: str) -> str:
        """A digest of the part's source files; a new value means the cache entry must be rebuilt."""
        return fingerprint_files(self.files(part))

    # -- decoding --------------------------------------------------------------------------------------------

    def decode(self, part: str) -> Decoded:
        """Decode ``part`` into (uint8 (N, C, image_size, image_size), int64 (N,), meta)."""
        raise NotImplementedError
