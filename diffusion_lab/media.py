"""Images out: [-1, 1] tensors to uint8, PNG grids and GIF animations (torchvision and imageio)."""

from __future__ import annotations

import math
from pathlib import Path

import imageio.v2 as imageio
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid

__all__ = ["to_uint8", "grid_image", "save_grid", "save_animation"]


def to_uint8(x: Tensor) -> Tensor:
    """(B, C, H, W) floats in [-1, 1] -> uint8 in [0, 255] (values outside are clipped)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_image(images: Tensor, nrow: int | None = None, min_tile: int = 48) -> Tensor:
    """uint8 (B, C, H, W) -> one uint8 (H', W', C) grid, tiles upscaled (nearest) to >= ``min_tile`` px."""
    B, C, H, W = images.shape
    scale = max(1, math.ceil(min_tile / max(H, W)))
    x = images.float()
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    nrow = nrow or max(1, math.ceil(math.sqrt(B)))
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=128.0)  # (3, H', W') for C in {1, 3}
    return grid.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(path, grid_image(images, nrow).numpy())
    return path


def save_animation(frames: list[Tensor], path: str | Path, fps: float = 10.0, hold_last: int = 10) -> Path:
    """A looping GIF of uint8 (B, C, H, W) frames (each a grid), the last frame held ``hold_last`` times."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [grid_image(f).numpy() for f in frames]
    images += [images[-1]] * hold_last
    imageio.mimsave(path, images, duration=1.0 / fps, loop=0)
    return path
