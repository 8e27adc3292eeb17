"""A test-only callback: NaN in one rank's first gradient at one step, after DDP's all-reduce (so only that
rank sees it), and each rank's weights written to ``<out>/rank<r>.pt`` when training ends."""

from pathlib import Path

import lightning.pytorch as pl
import torch


class NanOnRank(pl.Callback):
    def __init__(self, step: int, rank: int, out: str):
        self.step, self.rank, self.out = step, rank, Path(out)

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            next(pl_module.model.parameters()).grad.fill_(float("nan"))

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(pl_module.model.state_dict(), self.out / f"rank{trainer.global_rank}.pt")
