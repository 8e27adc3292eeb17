"""A test-only callback that kills its own process (SIGKILL, no clean-up) after a given training step."""

import os
import signal

import lightning.pytorch as pl


class KillAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
