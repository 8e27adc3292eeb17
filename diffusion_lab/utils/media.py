"""Pixel ranges and images out: the one uint8 <-> float pair, PNG grids and GIF animations.

Two float ranges meet uint8 pixels in this project: the models' data range [-1, 1] (``to_unit_range`` and
back with ``to_uint8(x, value_range=(-1, 1))``), and 0..255 floats from resizing or mixing uint8 images
(``to_uint8(x, value_range=(0, 255))``). Every caller names its range.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["to_uint8", "to_unit_range", "grid_image", "save_grid", "save_animation"]


def to_uint8(x: Tensor, *, value_range: tuple[float, float]) -> Tensor:
    """Float images whose values span ``value_range`` = (low, high) -> uint8 in [0, 255].

        u = round(255 (x - low) / (high - low)),  clipped to [0, 255]

    ``value_range=(-1, 1)`` for model outputs and samples, ``(0, 255)`` for interpolated pixels. A
    floating-point tensor of exactly 0..255 values is rounded and clamped in place (no copy), as the data
    pipeline does with whole datasets.
    """
    low, high = (float(v) for v in value_range)
    if not high > low:
        raise ValueError(f"to_uint8: value_range must be (low, high) with high > low, got {value_range}")
    if not x.is_floating_point():
        x = x.float()
    if (low, high) != (0.0, 255.0):
        x = (x.float() - low) * (255.0 / (high - low))
    return x.round_().clamp_(0, 255).to(torch.uint8)


def to_unit_range(x: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], the models' data range.

    The inverse of ``to_uint8(x, value_range=(-1, 1))`` on the 256 pixel values.
    """
    return x.float() / 127.5 - 1.0


def grid_image(images: Tensor, nrow: int | None = None, min_tile: int = 48) -> Tensor:
    """uint8 (B, C, H, W) -> one uint8 (H', W', C) grid, tiles upscaled (nearest) to >= ``min_tile`` px."""
    from torchvision.utils import make_grid

    B, C, H, W = images.shape
    scale = max(1, math.ceil(min_tile / max(H, W)))
    x = images.float()
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    nrow = nrow or max(1, math.ceil(math.sqrt(B)))
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=128.0)  # (3, H', W') for C in {1, 3}
    return grid.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(path, grid_image(images, nrow).numpy())
    return path


def save_animation(frames: list[Tensor], path: str | Path, fps: float = 10.0, hold_last: int = 10) -> Path:
    """A looping GIF of uint8 (B, C, H, W) frames (each a grid), the last frame held ``hold_last`` times."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [grid_image(f).numpy() for f in frames]
    images += [images[-1]] * hold_last
    imageio.mimsave(path, images, duration=1.0 / fps, loop=0)
    return path
