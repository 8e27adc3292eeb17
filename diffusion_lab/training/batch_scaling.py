"""A larger batch per GPU: what to change with it so that the run stays the same run.

Counted in images, not in steps, a run is the same at another batch size when

- the EMA averages over the same number of images: a half-life of ``h`` images (EDM's ``ema_halflife_kimg``
  x 1000) is a decay per update of ``0.5 ** (B k / h)`` for batch ``B`` and an update every ``k`` steps
  (Karras et al. 2022, App. F.3: ``ema_beta = 0.5 ** (batch_size / ema_halflife_nimg)``);
- the warm-up and the schedule's length are the same number of images (steps x B);
- the learning rate grows with the batch: for Adam(W) by the square root of the batch ratio (Malladi et al.
  2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"), linearly for SGD (Goyal et al.
  2017). The square root rule is a starting point to check, not a law: EDM trains CIFAR-10 at batch 512
  with lr 1e-3 (its own network and loss); DDPM at batch 128 with 2e-4, which the rule takes to 4e-4.

    DDPM CIFAR-10 (batch 128, lr 2e-4, EMA 0.9999, 5,000 warm-up steps) at batch 512:
    lr = scaled_lr(2e-4, 512, 128) = 4e-4; decay = ema_decay(ema_halflife_images(0.9999, 128), 512)
    = 0.99960 (half-life 887k images); warm-up 5,000 x 128 / 512 = 1,250 steps.
"""

from __future__ import annotations

import math

__all__ = ["ema_decay", "ema_halflife_images", "scaled_lr"]


def ema_decay(halflife_images: float, batch_size: int, every_n_steps: int = 1) -> float:
    """EMA decay per update for a half-life of ``halflife_images`` images: ``0.5 ** (B k / h)``.

    Args:
        halflife_images: images after which a weight's share of the average has halved (EDM's
            ``ema_halflife_kimg * 1000``: 500,000 for CIFAR-10).
        batch_size: images per optimizer step, over all GPUs (per-GPU batch x GPUs x accumulation).
        every_n_steps: optimizer steps between EMA updates (``callbacks.ema.update_every_n_steps``).
    """
    if halflife_images <= 0 or batch_size < 1 or every_n_steps < 1:
        raise ValueError(
            f"ema_decay: need halflife_images > 0, batch_size >= 1, every_n_steps >= 1; got "
            f"{halflife_images}, {batch_size}, {every_n_steps}"
        )
    return 0.5 ** (batch_size * every_n_steps / halflife_images)


def ema_halflife_images(decay: float, batch_size: int, every_n_steps: int = 1) -> float:
    """The half-life in images of an EMA ``decay`` per update (the inverse of :func:`ema_decay`)."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema_halflife_images: decay must lie in (0, 1), got {decay}")
    return batch_size * every_n_steps * math.log(0.5) / math.log(decay)


def scaled_lr(lr: float, batch_size: int, base_batch_size: int, rule: str = "sqrt") -> float:
    """The learning rate for ``batch_size`` of a run tuned with ``lr`` at ``base_batch_size``.

    ``rule``: "sqrt" (Adam / AdamW: lr x sqrt(B / B0)) or "linear" (SGD: lr x B / B0).
    """
    ratio = batch_size / base_batch_size
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    if rule == "linear":
        return lr * ratio
    raise ValueError(f"scaled_lr: rule={rule!r}; choose sqrt (Adam, AdamW) or linear (SGD)")
