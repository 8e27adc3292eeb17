"""One LightningDataModule for every dataset: decode once, cache, then serve batches from memory.

Pipeline::

    source files --(prepare_data: fetch + decode, one process)--> cache/<name>-<part>-...pt  (uint8 N,C,H,W)
    cache --(setup: load)--> in-memory uint8 tensor --(seeded split)--> train / val / test index tensors
    index batch --(tensor indexing, x / 127.5 - 1, optional flip)--> (x float32 in [-1, 1], y int64)

Batches are gathered with one indexing op per batch (``Dataset.__getitems__``), not per-item collation, so
loading never limits training; ``num_workers: 0`` is the right default for in-memory data.

Splits: each source names a part to train on and (usually) a part to test on. ``val_fraction`` of the
training part is held out for validation by a permutation seeded with ``seed`` (the same on every run and
every rank). Sources without a separate test file (``digits``, ``folder``, ``mnist``/``cifar10`` with
``split: test``) serve the held-out validation slice as the test set too, so nothing evaluated was trained on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffusion_lab.data.batches import ResumableBatches
from diffusion_lab.data.cache import cache_key, default_cache_dir, load_or_build
from diffusion_lab.data.cifar10 import Cifar10Source
from diffusion_lab.data.digits import DigitsSource
from diffusion_lab.data.folder import FolderSource
from diffusion_lab.data.mnist import MnistSource
from diffusion_lab.data.persian import PersianSource
from diffusion_lab.data.persian_letters import PersianLettersSource
from diffusion_lab.data.source import DataSource
from diffusion_lab.data.transforms import single_thread

__all__ = ["DiffusionDataModule", "TensorBatches", "SOURCES"]

# The registry: ``dataset.name`` -> source class (conf/dataset/<name>.yaml sets the name).
SOURCES: dict[str, type[DataSource]] = {
    cls.name: cls
    for cls in (DigitsSource, MnistSource, PersianSource, PersianLettersSource, FolderSource, Cifar10Source)
}
SUBSETS = ("train", "val", "test")


class TensorBatches(Dataset):
    """Whole batches from in-memory uint8 images: one gather, scale to [-1, 1], optional horizontal flip.

    Args:
        images: uint8 (N, C, H, W), shared by every subset of a part.
        labels: int64 (N,).
        index:  int64 (M,) rows of ``images`` that form this subset.
        hflip:  flip each image left-right with probability 1/2.
    """

    def __init__(self, images: Tensor, labels: Tensor, index: Tensor, hflip: bool = False):
        self.images, self.labels, self.index, self.hflip = images, labels, index, hflip

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(
        self, batch: list[int] | Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        # one thread: these few-microsecond ops slow down 10-100x when torch's thread pool meets a busy CPU
        with single_thread():
            rows = self.index[torch.as_tensor(batch, dtype=torch.int64)]
            x = self.images[rows].float().div_(127.5).sub_(1.0)  # (B, C, H, W) in [-1, 1]
            if self.hflip:
                flip = torch.rand(len(rows), generator=generator) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            return x, self.labels[rows]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]


def _whole_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``collate_fn`` for :class:`TensorBatches`: the batch is already assembled."""
    return batch


class DiffusionDataModule(L.LightningDataModule):
    """Images (B, C, H, W) float32 in [-1, 1] and labels (B,) int64 for any dataset in :data:`SOURCES`.

    Args:
        name: dataset (``digits``, ``mnist``, ``persian``, ``persian_letters``, ``folder``, ``cifar10``).
        root: folder of the dataset's files (unused by ``digits``).
        split: which stored part trains (per dataset, e.g. mnist ``train``/``test``, persian ``auto``).
        image_size: side of the square images (dataset default when null).
        channels: 1 or 3 (dataset default when null; ``folder`` infers it from the files).
        num_classes: class count; null takes the dataset's. Labels must lie below it.
        batch_size: images per batch.
        num_workers: DataLoader workers (0 is right for in-memory data).
        val_fraction: share of the training part held out for validation (and test where no test file).
        seed: seed of the train/val permutation and of ``real_images`` subsets.
        hflip: random horizontal flips of training batches (null: dataset default, on for cifar10 only).
        balance_classes: draw training images so that every class is equally frequent (see
            :class:`ResumableBatches`); validation and test keep the data's own class shares.
        cache_dir: decoded-dataset cache (null: $DIFFUSION_LAB_CACHE or ~/.cache/diffusion_lab).
        download: fetch missing files from the published sources.
        **options: dataset-specific settings (mnist/persian/cifar10 ``mirrors``, persian ``box_fraction``,
            folder ``labels``).
    """

    def __init__(
        self,
        name: str = "digits",
        root: str | Path | None = None,
        split: str | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        num_classes: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        seed: int = 0,
        hflip: bool | None = None,
        balance_classes: bool = False,
        cache_dir: str | Path | None = None,
        download: bool = False,
        **options: Any,
    ):
        super().__init__()
        if name not in SOURCES:
            raise ValueError(f"unknown dataset '{name}'; choose one of {sorted(SOURCES)} (dataset=<name>)")
        cls = SOURCES[name]
        try:
            self.source = cls(
                root=root, image_size=image_size, channels=channels, download=download, **options
            )
        except TypeError as e:
            if "unexpected keyword" not in str(e):
                raise
            raise ValueError(f"dataset '{name}': unknown setting in {sorted(options)} ({e})") from e
        if not 0 <= val_fraction < 1:
            raise ValueError(f"dataset '{name}': val_fraction must lie in [0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"dataset '{name}': batch_size must be at least 1, got {batch_size}")
        self.name = name
        self.split = split or cls.default_split
        self.source.check_split(self.split)
        self.image_size = self.source.image_size
        self._num_classes = num_classes
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.hflip = cls.default_hflip if hflip is None else bool(hflip)
        self.balance_classes = bool(balance_classes)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self._plan: tuple[str, str | None] | None = None
        self._parts: dict[str, dict[str, Any]] = {}
        self._subsets: dict[str, tuple[str, Tensor]] = {}
        self._train_batches: ResumableBatches | None = None
        self._pending_state: dict[str, int] | None = None

    # -- static facts (no data loaded) -----------------------------------------------------------------------

    @property
    def channels(self) -> int:
        return self.source.channels

    @property
    def num_classes(self) -> int:
        return int(self._num_classes) if self._num_classes is not None else self.source.num_classes

    @property
    def class_names(self) -> list[str]:
        """Names of classes 0 .. num_classes - 1 for grids and loggers (the label numbers where unnamed)."""
        names = list(self.source.class_names())
        return names if len(names) == self.num_classes else [str(i) for i in range(self.num_classes)]

    def plan(self) -> tuple[str, str | None]:
        """(stored part that trains, stored part that tests or None for the held-out slice)."""
        if self._plan is None:
            self._plan = self.source.plan(self.split)
        return self._plan

    # -- cache -----------------------------------------------------------------------------------------------

    def cache_path(self, part: str) -> Path:
        """Cache file of a stored part, keyed by dataset, part, size, channels, options, source checksums."""
        fields = {
            "dataset": self.name,
            "part": part,
            "image_size": self.image_size,
            "channels": self.channels,
            "options": self.source.options(),
            "source": self.source.fingerprint(part),
        }
        return (
            self.cache_dir
            / f"{self.name}-{part}-{self.image_size}px-{self.channels}ch-{cache_key(fields)}.pt"
        )

    def _build(self, part: str) -> dict[str, Any]:
        images, labels, meta = self.source.decode(part)
        expected = (self.channels, self.image_size, self.image_size)
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise RuntimeError(
                f"dataset '{self.name}' decoded {tuple(images.shape)} {images.dtype}, "
                f"expected (N, {expected}) uint8"
            )
        if labels.dtype != torch.int64 or labels.shape != (len(images),):
            raise RuntimeError(f"dataset '{self.name}' decoded labels {tuple(labels.shape)} {labels.dtype}")
        return {
            "images": images.contiguous(),
            "labels": labels,
            "meta": {**meta, "part": part, "count": len(images)},
        }

    def load_part(self, part: str) -> dict[str, Any]:
        """A stored part {"images": uint8 (N, C, H, W), "labels": int64 (N,), "meta"}, fetched if needed."""
        if part not in self._parts:
            self.source.fetch(part)
            entry = load_or_build(self.cache_path(part), lambda: self._build(part))
            labels = entry["labels"]
            if len(labels) and int(labels.max()) >= self.num_classes:
                raise ValueError(
                    f"dataset '{self.name}': labels reach {int(labels.max())} but num_classes is "
                    f"{self.num_classes}; set dataset.num_classes=null (inferred) or larger"
                )
            self._parts[part] = entry
        return self._parts[part]

    # -- Lightning hooks -------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download and decode into the cache (Lightning runs this on one process per node)."""
        parts = tuple(dict.fromkeys(p for p in self.plan() if p is not None))
        self.source.fetch(*parts)  # one error listing every missing file
        for part in parts:
            self.load_part(part)

    def setup(self, stage: str | None = None) -> None:
        """Load the cached parts this stage needs and build the seeded split."""
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}
        for subset in wanted.get(stage, SUBSETS) if stage is not None else SUBSETS:
            self._subset(subset)

    def _split(self, n: int) -> tuple[Tensor, Tensor]:
        """Seeded (train rows, val rows), each sorted; at least one row each way when val_fraction > 0."""
        n_val = 0 if self.val_fraction == 0 else min(max(1, round(self.val_fraction * n)), n - 1)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return perm[n_val:].sort().values, perm[:n_val].sort().values

    def _subset(self, subset: str) -> tuple[str, Tensor]:
        """(stored part, row index) of ``train``, ``val`` or ``test``."""
        if subset not in SUBSETS:
            raise ValueError(f"split must be one of {list(SUBSETS)}, got '{subset}'")
        if subset not in self._subsets:
            fit_part, test_part = self.plan()
            if subset == "test" and test_part is not None:
                n = len(self.load_part(test_part)["labels"])
                self._subsets["test"] = (test_part, torch.arange(n))
            elif subset == "test":
                if self.val_fraction == 0:
                    raise ValueError(
                        f"dataset '{self.name}' (split {self.split}) has no separate test file and "
                        "val_fraction is 0; set dataset.val_fraction > 0 to hold out a test slice"
                    )
                self._subsets["test"] = self._subset("val")
            else:
                train, val = self._split(len(self.load_part(fit_part)["labels"]))
                self._subsets["train"], self._subsets["val"] = (fit_part, train), (fit_part, val)
        return self._subsets[subset]

    def dataset(self, subset: str) -> TensorBatches:
        part, index = self._subset(subset)
        entry = self.load_part(part)
        return TensorBatches(entry["images"], entry["labels"], index, hflip=self.hflip and subset == "train")

    def _loader(self, subset: str) -> DataLoader:
        return DataLoader(
            self.dataset(subset),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_whole_batch,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> ResumableBatches:
        """Seeded, rank-sharded training batches that resume mid-epoch (see :class:`ResumableBatches`)."""
        ds = self.dataset("train")
        if len(ds) == 0:
            raise ValueError(
                f"dataset '{self.name}': the training split is empty; lower dataset.val_fraction"
            )
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self._train_batches = ResumableBatches(
            ds,
            self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world,
            balance_classes=self.balance_classes,
        )
        if self._pending_state is not None:
            self._train_batches.load_state_dict(self._pending_state)
            self._pending_state = None
        return self._train_batches

    # -- exact resume: the position in the data order travels in the checkpoint ----------------------------

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batches handed to training_step (prefetched ones do not count)."""
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train_batches is not None:
            self._train_batches.mark_consumed()
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"train_batches": self._train_batches.state_dict()} if self._train_batches is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("train_batches")
        if state is None:
            return
        if self._train_batches is not None:
            self._train_batches.load_state_dict(state)
        else:
            self._pending_state = state

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    # -- real images for metrics and previews ----------------------------------------------------------------

    def real_images(self, split: str = "val", n: int | None = None) -> tuple[Tensor, Tensor]:
        """Real images of a split as stored: (uint8 (N, C, H, W), int64 (N,)).

        With ``n`` below the split's size, a seeded random subset (the same on every call) in file order.
        """
        part, index = self._subset(split)
        if n is not None and n < len(index):
            pick = torch.randperm(len(index), generator=torch.Generator().manual_seed(self.seed + 1))[:n]
            index = index[pick.sort().values]
        entry = self.load_part(part)
        return entry["images"][index], entry["labels"][index]

    def real_stats_key(self, split: str = "test", n: int | None = None) -> str:
        """The one cache key of the real-feature statistics of ``real_images(split, n)``: readable
        ``<name>-<split>-<size>px-<ch>ch-n<count|all>-`` and a hash of the stored part's key (dataset, part,
        size, channels, options, the source files' checksums) and of the rows taken from it, so that other
        data files, another held-out slice or another subset never reuse statistics of different images."""
        part, index = self._subset(split)
        if n is not None and n < len(index):
            pick = torch.randperm(len(index), generator=torch.Generator().manual_seed(self.seed + 1))[:n]
            index = index[pick.sort().values]
        rows = hashlib.sha1(index.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
        digest = cache_key({"part": self.cache_path(part).stem, "rows": rows})
        return f"{self.name}-{split}-{self.image_size}px-{self.channels}ch-n{n or 'all'}-{digest}"

    def __repr__(self) -> str:
        root = str(self.source.root) if self.source.root is not None else None
        return (
            f"DiffusionDataModule(name={self.name!r}, split={self.split!r}, image_size={self.image_size}, "
            f"root={root!r})"
        )
