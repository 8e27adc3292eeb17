"""Training batches in an order fixed by (seed, epoch): resumable mid-epoch, sharded by rank."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["ResumableBatches"]


class ResumableBatches:
    """Shuffled batches of a ``TensorBatches`` dataset, with a position that can be saved and restored.

    Epoch e uses the permutation of ``torch.Generator().manual_seed(seed * 1_000_003 + e)``; rank r of W
    takes every W-th index of it (each rank the same number, the remainder dropped), and cuts it into
    ``len(self)`` full batches. Horizontal flips draw from a generator seeded by (seed, epoch, batch, rank).

    With ``balance_classes`` an epoch is K * m draws, m the largest class's size: each class's images in
    a random order, repeated (reshuffled) until m, all K classes pooled and shuffled. Every image is seen
    at least once an epoch and every class equally often, so the training distribution has a uniform class
    prior (the labels choose the draws only; an unconditional model never sees them).

    The position counts batches *consumed* by training (``mark_consumed``, called by the DataModule as a
    batch goes to the training step), not batches fetched: Lightning prefetches one ahead, and a resumed
    run must start at the first batch the interrupted one never trained on.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        balance_classes: bool = False,
    ):
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        self.consumed = 0
        self.by_class: list[Tensor] | None = None
        if balance_classes:
            labels = dataset.labels[dataset.index]
            self.by_class = [(labels == c).nonzero()[:, 0] for c in labels.unique()]

    @property
    def epoch_size(self) -> int:
        """Draws per epoch (all ranks): the dataset's size, or K * (largest class) when balancing classes."""
        if self.by_class is None:
            return len(self.dataset)
        return len(self.by_class) * max(len(ix) for ix in self.by_class)

    def __len__(self) -> int:
        per_rank = self.epoch_size // self.world_size
        if per_rank == 0:
            n = len(self.dataset)
            raise ValueError(f"{n} training images cannot be shared by {self.world_size} ranks")
        return max(1, per_rank // self.batch_size)  # a dataset smaller than a batch gives one short batch

    def draws(self, epoch: int) -> Tensor:
        """Every rank's dataset positions of epoch ``epoch``, in order, (epoch_size,)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.by_class is None:
            return torch.randperm(len(self.dataset), generator=g)
        m = self.epoch_size // len(self.by_class)  # the largest class's size
        per_class = []
        for ix in self.by_class:
            repeats = -(-m // len(ix))
            shuffles = [ix[torch.randperm(len(ix), generator=g)] for _ in range(repeats)]
            per_class.append(torch.cat(shuffles)[:m])
        pooled = torch.cat(per_class)
        return pooled[torch.randperm(len(pooled), generator=g)]

    def order(self, epoch: int) -> Tensor:
        """This rank's indices of epoch ``epoch``, (len(self) * batch_size,) or fewer for a tiny dataset."""
        perm = self.draws(epoch)
        per_rank = len(perm) // self.world_size
        mine = perm[self.rank :: self.world_size][:per_rank]
        return mine[: len(self) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, order = self.epoch, self.order(self.epoch)
        for b in range(self.consumed, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            key = ((self.seed * 1_000_003 + epoch) * 100_003 + b) * 1009 + self.rank
            g = torch.Generator().manual_seed(key)
            yield self.dataset.__getitems__(idx, generator=g)

    def mark_consumed(self) -> None:
        self.consumed += 1
        if self.consumed >= len(self):
            self.epoch, self.consumed = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("world_size", self.world_size) != self.world_size:
            # A different number of ranks reshards the data: keep the epoch, restart its order.
            self.epoch, self.consumed = int(state["epoch"]) + (1 if state["consumed"] else 0), 0
            return
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    def __repr__(self) -> str:
        return (
            f"ResumableBatches(n={len(self.dataset)}, batch_size={self.batch_size}, rank={self.rank}/"
            f"{self.world_size}, epoch={self.epoch}, consumed={self.consumed}"
            f"{', balanced' if self.by_class is not None else ''})"
        )
