"""A test-only callback that sends its own process a signal (SIGTERM, SIGUSR1) after a given training step."""

import os
import signal

import lightning.pytorch as pl


class SignalAt(pl.Callback):
    def __init__(self, step: int, signum: str = "SIGTERM"):
        self.step, self.signum, self.sent = step, getattr(signal, signum), False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class KillRankAt(pl.Callback):
    """SIGKILL (no clean-up) of one rank's own process after a given training step."""

    def __init__(self, step: int, rank: int):
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
