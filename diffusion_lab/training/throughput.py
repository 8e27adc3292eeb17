"""Training throughput (images/s), timed without a per-batch ``synchronize``.

Lightning's ``ThroughputMonitor`` synchronises the device after every batch, so that its per-batch host
times are true: the host then waits for each step to finish before it queues the next one.
:class:`ImagesPerSecond` counts images on the host every batch (the batch shape, no device read) and
synchronises only at logging steps (:func:`~diffusion_lab.training.host_sync.is_log_step`) and around
validation, where the time between two such points is the true time of the steps in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from diffusion_lab.training.host_sync import LogStepLatch, synchronize

__all__ = ["ImagesPerSecond"]


class ImagesPerSecond(pl.Callback):
    """Log ``train/device/samples_per_sec`` (images/s of this device; ``train/samples_per_sec`` of all
    devices under DDP), ``train/device/batches_per_sec``, ``train/samples``, ``train/batches`` and
    ``train/time`` at logging steps; FLOP/s where the module has a ``flops_per_batch``.

    The rates are taken over the last ``window_size - 1`` logging intervals (``window_size=2``: the steps
    since the previous logging step), training time only (validation excluded). The first value comes at the
    second logging step, so the first interval (compilation, warm-up) is not in any rate.

    Args:
        batch_size_fn: ``batch -> images in it``.
        window_size: logging steps in the rolling window (>= 2).
    """

    def __init__(self, batch_size_fn: Callable[[Any], int], window_size: int = 2, separator: str = "/"):
        if window_size < 2:
            raise ValueError(
                f"window_size must be at least 2 (a rate needs two logging steps), got {window_size}"
            )
        self.batch_size_fn = batch_size_fn
        self.window_size = window_size
        self.separator = separator
        self._throughput: Throughput | None = None
        self._samples = 0
        self._batches = 0
        self._train_time = 0.0  # seconds of training since the fit started, up to the last mark
        self._mark: float | None = None  # host time of the last synchronisation in training, None outside it
        self._log_step = LogStepLatch()
        self._batches_at_last_log = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._throughput = Throughput(
            world_size=trainer.world_size,
            window_size=self.window_size,
            separator=self.separator,
        )

    def _pause(self, trainer: pl.Trainer) -> None:
        """Add the time since the last mark to the training time (after the device finished its work)."""
        if self._mark is not None:
            synchronize(trainer.strategy.root_device)
            now = time.perf_counter()
            self._train_time += now - self._mark
            self._mark = now

    def _resume(self, trainer: pl.Trainer) -> None:
        synchronize(trainer.strategy.root_device)
        self._mark = time.perf_counter()

    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._samples = self._batches = self._batches_at_last_log = 0
        self._train_time = 0.0
        self._resume(trainer)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self._log_step.note(trainer)

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ):
        self._samples += self.batch_size_fn(batch)
        self._batches += 1
        if not self._log_step.take():
            return
        self._pause(trainer)
        assert self._throughput is not None
        flops = getattr(pl_module, "flops_per_batch", None)
        self._throughput.update(
            time=self._train_time,
            batches=self._batches,
            samples=self._samples,
            flops=None if flops is None else flops * (self._batches - self._batches_at_last_log),
        )
        self._batches_at_last_log = self._batches
        metrics = self._throughput.compute()
        # as Lightning's ThroughputMonitor: to the loggers at the step of this step's other metrics
        trainer._logger_connector.log_metrics({f"train{self.separator}{k}": v for k, v in metrics.items()})

    @rank_zero_only
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._pause(trainer)
            self._mark = None

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._resume(trainer)
