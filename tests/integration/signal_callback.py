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
