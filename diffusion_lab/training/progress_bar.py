"""Lightning's rich progress bar, counting optimizer steps over the whole run instead of batches per epoch.

Training here is step-based (``trainer.max_steps``, ``max_epochs=-1``) and the data module's epochs are
short, so Lightning's bar shows ``Epoch 1/-2 7/7``. :class:`StepProgressBar` shows one training bar for the
run, ``Training step 1234/3000``, with elapsed time and ETA; its total is Lightning's
``trainer.estimated_stepping_batches`` (``max_steps`` when set, else ``max_epochs`` x batches per epoch /
gradient accumulation) and its count ``trainer.global_step``, so a resumed run starts at the step it resumes
from. Validation bars are Lightning's own.

Like :func:`diffusion_lab.utils.progress.track`, it draws only where
:func:`~diffusion_lab.utils.progress.progress_enabled`
(a terminal on stderr, or ``DIFFUSION_LAB_PROGRESS=1``),
and it writes to stderr; in logs and CI it stays quiet. While it is shown, the ``track`` bars of loops
run inside training (sample grids, FID) stay quiet. The step count moves every step; the metrics shown
beside it (the loss) are read from the device at logging steps only
(:mod:`diffusion_lab.training.host_sync`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar

from diffusion_lab.training.host_sync import LogStepLatch
from diffusion_lab.utils import progress

__all__ = ["StepProgressBar"]

TRAIN_DESCRIPTION = "Training step"
LOSS_KEY = "train/loss"  # shown beside the bar


class StepProgressBar(RichProgressBar):
    """One training bar over all optimizer steps of the run (count = ``global_step``), with ETA.

    Args: those of Lightning's ``RichProgressBar``; ``console_kwargs`` default to ``{"stderr": True}``.
    """

    def __init__(self, *args: Any, console_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, console_kwargs={"stderr": True, **(console_kwargs or {})}, **kwargs)
        self._holds_track = False
        self._log_step = LogStepLatch()

    @property
    def total_train_batches(self) -> int | float:
        """Optimizer steps of the whole run (``inf`` when unbounded: the bar then pulses, without ETA)."""
        return self.trainer.estimated_stepping_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return TRAIN_DESCRIPTION

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # disables the bar on ranks other than 0
        if not progress.progress_enabled():
            self.disable()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.is_enabled and not self._holds_track:
            progress._active += 1  # an outer bar is shown: nested track() bars stay quiet
            self._holds_track = True

    def _release_track(self) -> None:
        if self._holds_track:
            progress._active -= 1
            self._holds_track = False

    def _initialize_train_progress_bar_id(self) -> None:
        # start at the current step, so that a resumed run's ETA is not skewed by a jump from 0
        assert self.progress is not None
        self.train_progress_bar_id = self.progress.add_task(
            TRAIN_DESCRIPTION, total=self.total_train_batches, completed=self.trainer.global_step
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # one bar for the run: created at the first epoch, never reset at the next ones
        if self.is_enabled and self.progress is not None and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
            self.refresh()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self._log_step.note(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.is_enabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        if self._log_step.take():  # reading the logged values waits for the device
            self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Lightning's bar metrics plus the training loss. The module logs ``train/loss`` without
        ``prog_bar``: Lightning turns every ``prog_bar`` value into a Python number after every batch (a
        device read per step); here it is read only when the bar shows metrics, at logging steps."""
        items = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get(LOSS_KEY)
        if loss is not None:
            items[LOSS_KEY] = float(loss)
        return items

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._release_track()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._release_track()
