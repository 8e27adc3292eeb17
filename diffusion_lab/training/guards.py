"""Stop (or skip) a training step whose loss or gradient is not finite, before the weights are touched,
without the host waiting for the device.

The check runs between backward and the optimizer step, on the device: ``bad`` = the loss or a gradient
holds a NaN or an inf, decided by tensor ops and not read on the host inside the step. The optimizer's fused
step reads it: torch's fused Adam, AdamW and SGD take it as ``found_inf`` (as from a gradient scaler) and
then leave every weight and every optimizer state as they were (the module builds them fused by default,
:func:`~diffusion_lab.training.optim.build_optimizer`). The verdicts are read back on the host at logging
steps (:func:`~diffusion_lab.training.host_sync.is_log_step`), before every checkpoint is written and when
training ends:

* ``nan_policy=stop`` (default): the first non-finite step and every step after it leave the weights as they
  were, and the next read-back raises :class:`NonFiniteError` -- one line naming that step and the
  quantity. A checkpoint save reads the verdict first and raises instead of writing, so the last checkpoint
  on disk is the last finite one (and the weights in memory are those of the last finite step).
* ``nan_policy=skip``: a non-finite step leaves the weights and the optimizer state as they were; the
  count is logged as ``train/skipped_steps`` at logging steps. A run that keeps failing has diverged for
  good: after ``nan_skip_limit`` skipped steps in a row it stops as under ``stop`` (``null``: no limit).

An optimizer without a fused step (another class, ``fused=false``, or fp16 mixed precision, whose gradient
scaler owns the skip and where only the loss is checked) cannot skip on the device: there the guard reads the
verdict back once per step and drops the step's gradients, as a check on the host must.

Under DDP the gradients are checked after their all-reduce, and the verdict is all-reduced too (a max, no
host wait), so every rank takes the same decision at the same step.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from torch import Tensor

from diffusion_lab.training.host_sync import LogStepLatch
from diffusion_lab.utils.cli import CommandError

log = logging.getLogger(__name__)

__all__ = ["NonFiniteGuard", "NonFiniteError", "NAN_POLICIES"]

NAN_POLICIES = ("stop", "skip")

# Slots of the guard's device-side state (one float64 vector, read back with one transfer).
SKIPPED, IN_A_ROW, HALTED, BAD_NOW = 0, 1, 2, 3
FIRST, HALT = 4, 8  # each an event of 4 slots: step, parameter index (-1: the loss), names list, loss value
N_SLOTS = 12


class NonFiniteError(CommandError):
    """The loss or a gradient became NaN or infinite."""


def skips_on_device(optimizer: torch.optim.Optimizer, trainer: pl.Trainer) -> bool:
    """Whether ``optimizer.step`` skips a step by itself when given ``found_inf``: torch's fused step, and no
    fp16 gradient scaler (which sets ``found_inf`` itself)."""
    return (
        getattr(trainer.precision_plugin, "scaler", None) is None
        and getattr(optimizer, "_step_supports_amp_scaling", False)
        and all(group.get("fused") for group in optimizer.param_groups)
    )


class NonFiniteGuard(pl.Callback):
    """Check the loss (at backward) and the gradients (before the optimizer step) for NaN / inf on the device.

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
        self.skipped = 0  # host copies of the device counts, as of the last read-back
        self.in_a_row = 0
        self._state: Tensor | None = None  # (N_SLOTS,) float64 on the module's device
        self._found_inf: Tensor | None = None  # () float32: 1 = this step leaves the weights as they were
        self._loss_bad: Tensor | None = None  # () bool: a non-finite loss since the last optimizer step
        self._loss_value: Tensor | None = None
        self._names: list[tuple[str, ...]] = []  # the parameters whose gradients were checked, per layout
        self._warned = False
        self._raised = False
        self._log_step = LogStepLatch()

    # ------------------------------------------------------------------------------ on the device

    def _device_state(self, device: torch.device) -> Tensor:
        if self._state is None:
            state = torch.full((N_SLOTS,), -1.0, dtype=torch.float64, device=device)
            state[SKIPPED], state[IN_A_ROW], state[HALTED], state[BAD_NOW] = self.skipped, self.in_a_row, 0, 0
            self._state = state
            self._found_inf = torch.zeros((), dtype=torch.float32, device=device)
        return self._state

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        loss = loss.detach()
        bad = ~torch.isfinite(loss).all()
        value = loss.float().sum()
        if self._loss_bad is None:
            self._loss_bad, self._loss_value = bad, value
        else:  # gradient accumulation: the first non-finite loss of the step is the one named
            self._loss_value = torch.where(bad & ~self._loss_bad, value, self._loss_value)
            self._loss_bad = self._loss_bad | bad

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self._log_step.note(trainer)
        state = self._device_state(pl_module.device)
        device = state.device
        on_device = skips_on_device(optimizer, trainer)
        loss_bad = (
            self._loss_bad if self._loss_bad is not None else torch.zeros((), dtype=torch.bool, device=device)
        )
        loss_value = self._loss_value if self._loss_value is not None else torch.zeros((), device=device)
        self._loss_bad = self._loss_value = None

        grad_bad = torch.zeros((), dtype=torch.bool, device=device)
        param = torch.full((), -1.0, dtype=torch.float64, device=device)
        named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        if named and getattr(trainer.precision_plugin, "scaler", None) is None:  # fp16: the scaler checks
            names = tuple(n for n, _ in named)
            if not self._names or self._names[-1] != names:
                self._names.append(names)
            # max |g| per tensor in one fused pass: NaN or inf exactly when an element is (cannot overflow)
            finite = torch.isfinite(torch.stack(torch._foreach_norm([g for _, g in named], float("inf"))))
            grad_bad = ~finite.all()
            param = (~finite).to(torch.uint8).argmax().double()  # the first non-finite gradient
        flags = torch.stack([loss_bad, grad_bad]).float()
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # one verdict on every rank (a rank's loss, or its gradients, can be alone in being non-finite)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        loss_bad, bad = flags[0] > 0, flags.amax() > 0
        param = torch.where(loss_bad, -1.0, param)  # a non-finite loss is named first

        halted = state[HALTED] > 0
        fresh = bad & ~halted  # after a stop every step is frozen and no longer counted
        in_a_row = torch.where(fresh, state[IN_A_ROW] + 1, torch.where(halted, state[IN_A_ROW], 0.0))
        if self.policy == "stop":
            halt_now = fresh
        elif self.skip_limit is not None:
            halt_now = fresh & (in_a_row >= self.skip_limit)
        else:
            halt_now = torch.zeros_like(fresh)
        event = torch.stack(
            [
                torch.full_like(param, trainer.global_step),
                param,
                torch.full_like(param, len(self._names) - 1),
                loss_value.double(),
            ]
        )
        first = torch.where(fresh & (state[FIRST] < 0), event, state[FIRST : FIRST + 4])
        halt = torch.where(halt_now & ~halted, event, state[HALT : HALT + 4])
        counts = torch.stack(
            [state[SKIPPED] + fresh.double(), in_a_row, (halted | halt_now).double(), bad.double()]
        )
        state.copy_(torch.cat([counts, first, halt]))
        self._found_inf.copy_(bad | halted)

        if on_device:
            optimizer.found_inf = self._found_inf  # read by the fused step on the device
            return
        # no device-side skip: read the verdict now (one host wait per step) and drop the gradients
        if self._read()[BAD_NOW] > 0:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    # ------------------------------------------------------------------------- read back on the host

    def _read(self) -> list[float]:
        """The device state on the host (one transfer); raises :class:`NonFiniteError` once stopped."""
        if self._state is None:
            return [0.0] * N_SLOTS
        v = self._state.tolist()
        self.skipped, self.in_a_row = int(v[SKIPPED]), int(v[IN_A_ROW])
        if self.policy == "skip" and self.skipped and not self._warned:
            self._warned = True
            log.warning(
                "nan_policy=skip: %s, step skipped (train/skipped_steps counts them)", self._what(v, FIRST)
            )
        if v[HALTED] > 0 and not self._raised:
            self._raised = True
            what = self._what(v, HALT)
            if self.policy == "stop":
                raise NonFiniteError(
                    f"{what}; training stopped, the last checkpoint on disk is the last finite one; lower "
                    "optimizer.lr, or set nan_policy=skip to skip such steps"
                )
            raise NonFiniteError(
                f"{what}; {self.skip_limit} steps in a row skipped (nan_skip_limit={self.skip_limit}): "
                "the run has diverged, training stopped, the last checkpoint on disk is the last finite "
                "one; lower optimizer.lr, or raise nan_skip_limit"
            )
        return v

    def _what(self, v: list[float], slot: int) -> str:
        step, param, names, loss = v[slot : slot + 4]
        if param < 0:
            return f"non-finite loss at step {int(step)} (loss {loss})"
        return f"non-finite gradient ({self._names[int(names)][int(param)]}) at step {int(step)}"

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ):
        if not self._log_step.take() or self._state is None:
            return
        self._read()
        if self.policy == "skip":
            pl_module.log("train/skipped_steps", float(self.skipped))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        self._read()  # a stopped run writes no checkpoint: the last one on disk stays the last finite one

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read()
        self._detach(trainer)
        if self.skipped:
            log.warning(
                "nan_policy=skip: %d of %d steps skipped for a non-finite loss or gradient",
                self.skipped,
                trainer.global_step,
            )

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._detach(trainer)

    def _detach(self, trainer: pl.Trainer) -> None:
        for optimizer in trainer.optimizers:
            if self._found_inf is not None and getattr(optimizer, "found_inf", None) is self._found_inf:
                del optimizer.found_inf

    def state_dict(self) -> dict:
        self._read()  # called when a checkpoint is written
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.in_a_row = int(state_dict.get("in_a_row", 0))
        self._state = None  # rebuilt from these at the next step
