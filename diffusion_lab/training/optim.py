"""The optimizer (torch's fused step by default) and learning-rate schedules, built from ``_partial_`` Hydra
configs; the schedules are stepped once per optimizer step."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["build_optimizer", "fused_by_default", "warmup_cosine", "warmup_cosine_factor"]

# torch optimizers with a fused step on the CPU and on CUDA: one kernel for all parameters, and a step that
# skips itself on the device when its ``found_inf`` is set (diffusion_lab/training/guards.py)
FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
FUSED_DEVICES = ("cpu", "cuda")


def fused_by_default(factory: Callable[..., Optimizer], device_type: str) -> bool:
    """Whether :func:`build_optimizer` gives ``factory``'s optimizer torch's fused step on ``device_type``: a
    class of :data:`FUSED_OPTIMIZERS` whose config chooses none of ``fused``, ``foreach``, ``capturable``,
    ``differentiable`` (e.g. ``optimizer.fused=false`` keeps torch's default)."""
    func, keywords = getattr(factory, "func", factory), getattr(factory, "keywords", None) or {}
    chosen = {"fused", "foreach", "capturable", "differentiable"} & set(keywords)
    return (
        isinstance(func, type)
        and issubclass(func, FUSED_OPTIMIZERS)
        and not chosen
        and device_type in FUSED_DEVICES
    )


def build_optimizer(
    factory: Callable[..., Optimizer], params: Iterable[torch.Tensor], fused: bool
) -> Optimizer:
    """``factory(params)``, with ``fused=True`` when ``fused`` (see :func:`fused_by_default`).

    The fused step is the fastest on both devices (CPU, unet_tiny: 3.8 ms against 17 ms for torch's default
    per-tensor AdamW) and reads the non-finite guard's verdict on the device, without a host wait.
    """
    return factory(params, fused=True) if fused else factory(params)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int | None, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up from 1/warmup_steps to 1 over ``warmup_steps``; then cosine decay to ``min_lr_ratio`` at
    ``total_steps`` (constant after it); constant 1 when ``total_steps`` is None or ``min_lr_ratio`` is 1.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if not total_steps or total_steps <= warmup_steps or min_lr_ratio >= 1.0:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: Optimizer, warmup_steps: int = 0, total_steps: int | None = None, min_lr_ratio: float = 0.1
) -> LambdaLR:
    """A :class:`~torch.optim.lr_scheduler.LambdaLR` following :func:`warmup_cosine_factor`."""
    if total_steps is not None and total_steps < 0:  # Trainer(max_steps=-1): no known end, no decay
        total_steps = None
    return LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_lr_ratio)
    )
