"""A test-only callback that sleeps after every step, so that a run can be killed part-way."""

import time

import lightning.pytorch as pl


class Sleep(pl.Callback):
    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)
