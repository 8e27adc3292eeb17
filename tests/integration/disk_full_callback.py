"""A test-only callback: from a given training step on, files of this process may not grow past a limit
(RLIMIT_FSIZE, with SIGXFSZ ignored so that a write past it fails with EFBIG): a disk filling mid-run."""

import resource
import signal

import lightning.pytorch as pl


class FileSizeLimitAt(pl.Callback):
    def __init__(self, step: int, limit: int):
        self.step, self.limit = step, limit

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.limit))
