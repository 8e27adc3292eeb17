"""Whole-dataset image conversions on uint8 tensors (N, C, H, W): channel count and size."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lab.utils.media import to_uint8

__all__ = ["to_channels", "resize_square", "single_thread"]

# ITU-R BT.601 luma weights, as PIL's "L" conversion.
_LUMA = (0.299, 0.587, 0.114)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one thread: many small interpolations are slower with threads (worse on busy CPUs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def to_channels(images: Tensor, channels: int) -> Tensor:
    """Convert uint8 (N, C, H, W) to ``channels`` (1 or 3): grey repeated to RGB, RGB to BT.601 luma."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.repeat(1, 3, 1, 1)
    if c == 3 and channels == 1:
        w = torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1)
        return to_uint8((images.float() * w).sum(1, keepdim=True), value_range=(0, 255))
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels; use channels: 1 or 3")


def resize_square(images: Tensor, size: int, chunk: int = 4096) -> Tensor:
    """Resize (N, C, H, W) uint8 images so the shorter side is ``size``, then centre-crop to size x size.

    Bilinear with antialiasing (area-like when shrinking); processed in chunks to bound memory.
    """
    n, c, h, w = images.shape
    if h == size and w == size:
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    out = torch.empty(n, c, size, size, dtype=torch.uint8)
    for i in range(0, n, chunk):
        x = images[i : i + chunk].float()
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        out[i : i + chunk] = to_uint8(x[:, :, top : top + size, left : left + size], value_range=(0, 255))
    return out
