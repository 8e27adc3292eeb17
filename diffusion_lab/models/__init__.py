"""Backbones: plain ``nn.Module`` s with ``forward(x, t, y=None)`` and no knowledge of the diffusion."""

from __future__ import annotations

from torch import nn

from diffusion_lab.models.dit import DiT
from diffusion_lab.models.embeddings import timestep_embedding
from diffusion_lab.models.mlp import MLP
from diffusion_lab.models.unet import UNet

__all__ = ["UNet", "MLP", "DiT", "count_parameters", "timestep_embedding"]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``module`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
