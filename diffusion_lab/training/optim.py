"""Learning-rate schedules, built as ``_partial_`` Hydra configs and stepped once per optimizer step."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["warmup_cosine", "warmup_cosine_factor"]


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
