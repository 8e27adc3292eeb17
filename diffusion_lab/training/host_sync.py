"""The rule of the training step: it never waits for the device, except at Lightning's logging steps.

A read of a device value on the host (``.item()``, ``bool(tensor)``, ``.tolist()``, ``.cpu()``) or a
``synchronize`` makes the host wait until the device has run everything queued so far, so the device idles
while the host prepares the next step. The callbacks and the module read their device-side values (grad
norm, non-finite counts, throughput timing) only where Lightning writes the logs anyway:
:func:`is_log_step`. ``tests/integration/test_no_host_sync.py`` counts the reads over the steps in between.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

__all__ = ["LogStepLatch", "is_log_step", "synchronize"]


def is_log_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes the logs at the end of the optimizer step about to run.

    Call it before the optimizer step (``on_before_optimizer_step``, ``configure_gradient_clipping``): it is
    called once per optimizer step there, also under gradient accumulation, whose other batches end no step.
    Callbacks that read back in ``on_train_batch_end`` note the answer there (:class:`LogStepLatch`).
    Lightning logs when the step count after this step is a multiple of ``trainer.log_every_n_steps`` (and
    when the trainer is stopping).
    """
    n = trainer.log_every_n_steps
    if not n:
        return False
    return (trainer.global_step + 1) % n == 0 or trainer.should_stop


class LogStepLatch:
    """Whether the batch now ending ended a logging step: noted before its optimizer step, taken once after.

    ``note(trainer)`` from ``on_before_optimizer_step``; ``take()`` from ``on_train_batch_end`` is True at
    the end of a logging step and False at every other batch (gradient accumulation's included).
    """

    def __init__(self) -> None:
        self._now = False

    def note(self, trainer: pl.Trainer) -> None:
        self._now = is_log_step(trainer)

    def take(self) -> bool:
        now, self._now = self._now, False
        return now


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for on the CPU)."""
    if device.type != "cpu" and torch.accelerator.is_available():
        torch.accelerator.synchronize(device)
