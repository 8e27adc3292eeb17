"""Stop (or skip) a training step whose loss or gradient is not finite, before the weights are touched.

The check runs between backward and the optimizer step, so a NaN or inf never reaches the weights, their
EMA or a checkpoint:

* ``nan_policy=stop`` (default): raise :class:`NonFiniteError` -- one line naming the step and the
  quantity. Lightning saves nothing after an exception (no periodic save, no ``last.ckpt`` at the end), so
  the last checkpoint on disk is the last finite one.
* ``nan_policy=skip``: drop the step's gradients (the optimizer leaves every weight as it was), count it,
  and log the count as ``train/skipped_steps``. A run that keeps failing has diverged for good: after
  ``nan_skip_limit`` skipped steps in a row it stops as under ``stop`` (``null``: skip without a limit).

Under DDP the gradients are checked after their all-reduce, so every rank sees the same verdict. With fp16
mixed precision the gradient scaler already skips overflowing steps, so only the loss is checked there.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from torch import Tensor

from diffusion_lab.utils.cli import CommandError

log = logging.getLogger(__name__)

__all__ = ["NonFiniteGuard", "NonFiniteError", "NAN_POLICIES"]

NAN_POLICIES = ("stop", "skip")


class NonFiniteError(CommandError):
    """The loss or a gradient became NaN or infinite."""


class NonFiniteGuard(pl.Callback):
    """Check the loss (at backward) and the gradients (before the optimizer step) for NaN / inf.

    Args:
        policy: ``stop`` (raise :class:`NonFiniteError`) or ``skip`` (leave the weights unchanged this step).
        skip_limit: under ``skip``, raise :class:`NonFiniteError` once this many steps in a row were skipped
            (``None``: never).
    """

    def __init__(self, policy: str = "stop", skip_limit: int | None = 100):
        if policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy={policy!r} is not valid: choose stop or skip")
        if skip_limit is not None and (
            isinstance(skip_limit, bool) or not isinstance(skip_limit, int) or skip_limit < 1
        ):
            raise ValueError(f"nan_skip_limit={skip_limit!r} is not valid: give a whole number >= 1, or null")
        self.policy = policy
        self.skip_limit = skip_limit
        self.skipped = 0
        self.in_a_row = 0
        self._bad_loss: float | None = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            self._bad_loss = float(loss.detach().float().sum())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        step = trainer.global_step
        if self._bad_loss is not None:
            what = f"non-finite loss at step {step} (loss {self._bad_loss})"
        else:
            what = self._bad_gradient(trainer, pl_module, step)
        self._bad_loss = None
        self.in_a_row = self.in_a_row + 1 if what is not None else 0
        if what is not None:
            if self.policy == "stop":
                raise NonFiniteError(
                    f"{what}; training stopped, the last checkpoint on disk is the last finite one; lower "
                    "optimizer.lr, or set nan_policy=skip to skip such steps"
                )
            if self.skip_limit is not None and self.in_a_row >= self.skip_limit:
                raise NonFiniteError(
                    f"{what}; {self.in_a_row} steps in a row skipped (nan_skip_limit={self.skip_limit}): "
                    "the run has diverged, training stopped, the last checkpoint on disk is the last finite "
                    "one; lower optimizer.lr, or raise nan_skip_limit"
                )
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self.skipped += 1
            if self.skipped == 1:
                log.warning("nan_policy=skip: %s, step skipped (train/skipped_steps counts them)", what)
        if self.policy == "skip":
            pl_module.log("train/skipped_steps", float(self.skipped))

    def _bad_gradient(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> str | None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return None  # fp16: the gradient scaler skips overflowing steps itself
        named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        if not named:
            return None
        norms = torch._foreach_norm([g for _, g in named])  # one fused pass over all gradients
        if bool(torch.isfinite(torch.stack(norms)).all()):  # one device sync per step
            return None
        for name, g in named:  # rare: find the parameter (a norm can also overflow on finite values)
            if not bool(torch.isfinite(g).all()):
                return f"non-finite gradient ({name}) at step {step}"
        return None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.skipped:
            log.warning(
                "nan_policy=skip: %d of %d steps skipped for a non-finite loss or gradient",
                self.skipped,
                trainer.global_step,
            )

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.in_a_row = int(state_dict.get("in_a_row", 0))
