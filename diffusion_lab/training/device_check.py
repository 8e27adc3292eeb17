"""Refuse a GPU trainer on a machine without a usable GPU, in one line, before the run writes anything.

Lightning finds out only once the Trainer is built (``MisconfigurationException: No supported gpu backend
found!``), after Hydra has made the run directory and the run has read its data. :class:`DeviceCheckCallback`
asks first, at Hydra's ``on_run_start`` (before the run or sweep directory exists: it is listed before the
run-directory lock in ``conf/config.yaml``); ``train()`` asks again for callers that bypass Hydra.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from diffusion_lab.utils.cli import CommandError, exit_on_bad_input

__all__ = ["NoUsableGPU", "check_trainer_device", "DeviceCheckCallback"]

_GPU_ACCELERATORS = ("gpu", "cuda")


class NoUsableGPU(CommandError):
    """The trainer asks for GPUs this machine does not have."""


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return "this torch was built without CUDA"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "CUDA_VISIBLE_DEVICES hides every GPU"
    return "torch.cuda.is_available() is False"


def _is_ddp(strategy: Any) -> bool:
    if isinstance(strategy, (dict, DictConfig)):
        strategy = strategy.get("_target_", "")
    return "ddp" in str(strategy).lower()


def check_trainer_device(trainer: DictConfig | dict, choice: str | None = None) -> None:
    """Raise :class:`NoUsableGPU` (one line: the problem and ``trainer=cpu`` / ``trainer=ddp_cpu``) when
    ``trainer.accelerator`` is ``gpu`` / ``cuda`` and no CUDA device (nor, for ``gpu``, Apple's MPS) is
    usable, or when ``trainer.devices`` asks for more GPUs than there are.

    Args:
        trainer: the ``trainer`` config node (only ``accelerator``, ``strategy`` and ``devices`` are read).
        choice: the ``trainer=`` option it came from (``gpu``, ``ddp``), for the message.
    """
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if accelerator not in _GPU_ACCELERATORS:
        return
    ddp = _is_ddp(trainer.get("strategy"))
    name = f"trainer={choice}" if choice else f"trainer.accelerator={accelerator}"
    fix = "trainer=ddp_cpu (data-parallel CPU processes)" if ddp else "trainer=cpu"
    if torch.cuda.is_available():
        devices, count = trainer.get("devices"), torch.cuda.device_count()
        if isinstance(devices, int) and not isinstance(devices, bool) and devices > count:
            raise NoUsableGPU(
                f"{name} asks for trainer.devices={devices} GPUs but this machine has {count}: "
                f"set trainer.devices={count} (or auto)"
            )
        return
    if accelerator == "gpu" and torch.backends.mps.is_available():
        return  # Lightning's gpu accelerator runs on Apple's MPS too
    raise NoUsableGPU(f"{name} trains on a GPU, but no usable GPU is here ({_why_no_cuda()}): use {fix}")


def _choice(config: DictConfig) -> str | None:
    try:
        return config.hydra.runtime.choices.get("trainer")
    except Exception:  # no hydra node (composed without it)
        return None


class DeviceCheckCallback(Callback):
    """Hydra callback: :func:`check_trainer_device` before Hydra makes the run (or sweep) directory."""

    def _check(self, config: DictConfig) -> None:
        if config.get("trainer") is None:
            return
        with exit_on_bad_input():
            check_trainer_device(config.trainer, _choice(config))

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)
