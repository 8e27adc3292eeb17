"""Callbacks that the check puts into a real ``train()`` (``+callbacks.<name>._target_=...``): a step timer
that times windows of training steps as every row of the check is timed, and a per-step host-sync counter.

Both act at ``on_train_batch_start``: a window from the start of step a to the start of step b covers steps
a..b-1 entirely (loader, forward, backward, clipping, optimizer, EMA, logging), and nothing is synchronised
inside it. The instances register themselves in :data:`INSTANCES` so that the section reads them after
``train()`` returns (same process).
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch

from experiments.gpu_check.common import SyncCounter, sync

__all__ = ["INSTANCES", "StepTimer", "SyncsPerStep"]

INSTANCES: list[pl.Callback] = []


class StepTimer(pl.Callback):
    """Time ``repeats`` windows of ``steps`` training steps after ``warmup`` steps (the first step, with its
    compile, timed alone): CUDA events and the host clock per window, memory as in ``time_steps``, the host
    syncs inside each window by call site. Keeps the trained module (``module``) for a bare step after."""

    def __init__(self, warmup: int, steps: int, repeats: int = 3, count_syncs: bool = True):
        self.warmup, self.steps, self.repeats, self.count_syncs = (
            int(warmup),
            int(steps),
            int(repeats),
            count_syncs,
        )
        self.windows: list[dict[str, Any]] = []
        self.first_step_s: float | None = None
        self.memory: dict[str, float] = {}
        self.module: pl.LightningModule | None = None
        self._open: dict[str, Any] | None = None
        self._counter: SyncCounter | None = None
        self._t0 = 0.0
        INSTANCES.append(self)

    def _boundaries(self) -> list[int]:
        return [1 + self.warmup + r * self.steps for r in range(self.repeats + 1)]

    def on_train_start(self, trainer, pl_module) -> None:
        self.module = pl_module
        self.device = str(pl_module.device)
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps done so far
        if step == 0:
            sync(self.device)
            self._t0 = time.perf_counter()
        elif step == 1:
            sync(self.device)
            self.first_step_s = round(time.perf_counter() - self._t0, 2)
        if step not in self._boundaries():
            return
        cuda = self.device.startswith("cuda")
        if self._open is not None:  # close the window that ends here
            if cuda:
                self._open["end"].record()
            if self._counter is not None:
                self._counter.__exit__(None, None, None)
            sync(self.device)
            w = self._open
            w["host_s"] = time.perf_counter() - w["t0"]
            if cuda:
                w["device_s"] = w["begin"].elapsed_time(w["end"]) / 1000
            if self._counter is not None:
                w["syncs"] = self._counter.total
                w["sync_sites"] = dict(self._counter.counts.most_common(10))
            self.windows.append({k: v for k, v in w.items() if k not in ("begin", "end", "t0")})
            self._open = None
        if step == self._boundaries()[0] and cuda:  # after the warm-up: the steady state from here
            self.memory["first_steps_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            self.memory["first_steps_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
            torch.cuda.reset_peak_memory_stats()
        if step < self._boundaries()[-1]:
            sync(self.device)
            w = {"from_step": step, "steps": self.steps}
            if cuda:
                w["begin"], w["end"] = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
            self._counter = SyncCounter(self.device).__enter__() if self.count_syncs else None
            w["t0"] = time.perf_counter()
            if cuda:
                w["begin"].record()
            self._open = w
        elif cuda:
            self.memory["steady_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            self.memory["steady_reserved_gib"] = round(torch.cuda.memory_reserved() / 2**30, 3)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._counter is not None and self._open is not None:
            self._counter.__exit__(None, None, None)
        self._open = None


class SyncsPerStep(pl.Callback):
    """Host syncs of every training step from ``from_step`` on, by call site, each step marked as a logging
    step or not (Lightning writes the logs when ``(step + 1) % log_every_n_steps == 0``)."""

    def __init__(self, from_step: int = 2):
        self.from_step = int(from_step)
        self.steps: list[dict[str, Any]] = []
        self._counter: SyncCounter | None = None
        self._step = -1
        INSTANCES.append(self)

    def _close(self, trainer) -> None:
        if self._counter is None:
            return
        self._counter.__exit__(None, None, None)
        n = trainer.log_every_n_steps or 0
        self.steps.append(
            {
                "step": self._step,
                "log_step": bool(n) and (self._step + 1) % n == 0,
                "syncs": self._counter.total,
                "sites": dict(self._counter.counts),
            }
        )
        self._counter = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._close(trainer)
        if trainer.global_step >= self.from_step:
            self._step = trainer.global_step
            self._counter = SyncCounter(str(pl_module.device)).__enter__()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close(trainer)
