"""Preemption: SIGTERM (or SIGUSR1) before a cluster kills a job -> a resumable ``last.ckpt``, a clean exit.

Lightning does most of it: its signal connector sets ``trainer.received_sigterm`` on SIGTERM (on every rank:
rank 0's flag is broadcast) and the fit loop stops at the end of the current step with
:class:`~lightning.pytorch.utilities.exceptions.SIGTERMException`; under SLURM its ``SLURMEnvironment``
(``auto_requeue=True``, detected from SLURM's variables) also answers the requeue signal (SIGUSR1) with a
checkpoint in the run directory and ``scontrol requeue``. What it lacks, :class:`PreemptionCheckpoint` adds:

- a full ``last.ckpt`` (raw and EMA weights, optimizer, loops, data position) written when the fit stops on
  SIGTERM, where ``ckpt_path=last`` finds it; the step that was running finishes first, so the grace period
  must exceed one step (plus validation, when it was under way);
- outside SLURM, SIGUSR1 (sent by some schedulers instead of SIGTERM) is handled as SIGTERM.

``train`` turns the stop into :class:`Preempted` (the commands print one line, exit 143 = 128 + SIGTERM) and,
in a SLURM job that was requeued (``SLURM_RESTART_COUNT`` > 0, e.g. by the submitit launcher), resumes from
the run directory's own ``last.ckpt`` (:func:`requeued_checkpoint`).

A dead rank (``kill -9``, an out-of-memory kill): gloo sees the closed connection at the next collective, so
every other rank fails within about a second and ``train`` stops it with one line (:func:`lost_peer`); the
launching process also watches its ranks every 5 s and kills the rest when one died (Lightning's
``_ChildProcessObserver``). A rank that vanishes without closing its connection (a lost node) is given up
after the process group's timeout: ``trainer.strategy.timeout`` (conf/trainer/ddp_cpu.yaml: 600 s, torch's
default being 30 minutes). ``ckpt_path=last`` resumes from the last periodic checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("diffusion_lab")

__all__ = ["PreemptionCheckpoint", "Preempted", "requeued_checkpoint", "lost_peer", "PREEMPTED_EXIT_CODE"]

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class Preempted(RuntimeError):
    """The run stopped on SIGTERM / SIGUSR1 after saving a resumable checkpoint (named in the message)."""


def last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """Where ``last.ckpt`` goes: the first ``save_last`` ModelCheckpoint's folder, else <run>/checkpoints."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
            return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}.ckpt"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


def _forward_to_sigterm(signum: int, frame: FrameType | None) -> None:
    handler = signal.getsignal(signal.SIGTERM)  # during a fit: Lightning's own
    if callable(handler):
        handler(signal.SIGTERM, frame)


def _sigusr1_as_sigterm() -> None:
    """Answer SIGUSR1 as SIGTERM where nothing answers it (under SLURM, Lightning's requeue handler does).

    Called once Lightning has installed its signal handlers (they are in place from the sanity check on):
    its SIGTERM handler sets ``trainer.received_sigterm``, stops launched ranks and tells the other ranks;
    Lightning's teardown restores the SIGUSR1 handler from before the fit with the others.
    """
    if not hasattr(signal, "SIGUSR1") or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGUSR1, _forward_to_sigterm)


class PreemptionCheckpoint(pl.Callback):
    """Save a resumable ``last.ckpt`` when the fit stops on SIGTERM; make SIGUSR1 a SIGTERM outside SLURM."""

    def __init__(self) -> None:
        self.saved: Path | None = None
        self.step: int | None = None

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sigusr1_as_sigterm()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sigusr1_as_sigterm()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) and not trainer.received_sigterm:
            return
        if trainer.state.stage == RunningStage.VALIDATING:  # stopped mid-validation: raw weights back first
            for cb in trainer.callbacks:
                if isinstance(cb, WeightAveraging):
                    cb.on_validation_epoch_end(trainer, pl_module)
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # every rank calls it (it ends in a barrier)
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last:
                cb.last_model_path = str(path)
        self.saved, self.step = path, trainer.global_step
        log.info("preempted at step %d: saved %s", trainer.global_step, path)


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` says that another rank died (gloo: its connection closed) or did not answer within
    the process group's timeout (``DDPStrategy(timeout=...)``, conf/trainer/ddp_cpu.yaml)."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError)
        and any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Timed out"))
    )


def requeued_checkpoint(out_dir: Path) -> Path | None:
    """The run directory's own ``last.ckpt`` when this is a requeued SLURM job, else None."""
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        path = out_dir / "checkpoints" / "last.ckpt"
        return path if path.is_file() else None
    return None
