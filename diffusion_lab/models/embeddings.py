"""Sinusoidal timestep embedding (Vaswani et al. 2017, Sec. 3.5; used by DDPM, Ho et al. 2020, App. B)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["timestep_embedding"]


def timestep_embedding(t: Tensor | int | float, dim: int, max_period: float = 10000.0) -> Tensor:
    """Embed timesteps as sinusoids of geometrically spaced frequencies.

        freq_i = max_period^(-i / half),  i = 0, ..., half - 1,  half = dim // 2
        emb(t) = [cos(t freq_0), ..., cos(t freq_{half-1}), sin(t freq_0), ..., sin(t freq_{half-1})]

    This is the layout of Improved DDPM (cosines first); an odd ``dim`` gets one trailing zero column.

    Args:
        t: (B,) timesteps, int or float (fractional steps are fine), or a Python scalar (treated as B = 1).
        dim: embedding width, >= 1.
        max_period: the longest period, which sets the lowest frequency.

    Returns:
        (B, dim) float32 (or t's dtype if t is a float64/float16 tensor).
    """
    if dim < 1:
        raise ValueError(f"timestep_embedding: dim must be >= 1, got {dim}")
    t = torch.as_tensor(t)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding: t must have shape (B,), got {tuple(t.shape)}")
    dtype = t.dtype if t.is_floating_point() else torch.float32
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1)
    freqs = torch.exp(-math.log(max_period) * exponent)  # (half,)
    args = t.to(torch.float32)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)  # (B, dim)
    return emb.to(dtype)
