"""A fully connected denoiser: the smallest backbone that trains, for flattened small images and teaching.

    x (B, C, H, W) -> flatten -> Linear -> num_layers x MLPBlock(+ emb) -> LayerNorm, SiLU, Linear
      -> unflatten (B, C', H, W)

It sees every pixel at once but has no notion of locality, so it needs far more parameters than a U-Net for
the same quality; it is meant for 8-16 pixel images, tests and tutorials.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.models.embeddings import timestep_embedding
from diffusion_lab.models.unet import check_input_devices

__all__ = ["MLP", "MLPBlock"]


class MLPBlock(nn.Module):
    """Pre-norm residual MLP block conditioned on the embedding.

        h = Linear_1(LN(x)) + Linear_e(SiLU(emb))
        out = x + Linear_2(Dropout(SiLU(h)))

    Linear_2 starts at zero, so the block starts as the identity.
    """

    def __init__(self, dim: int, emb_dim: int, dropout: float = 0.0, expansion: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, expansion * dim)
        self.emb_proj = nn.Linear(emb_dim, expansion * dim)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(expansion * dim, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, dim), emb: (B, emb_dim) -> (B, dim)."""
        h = self.fc1(self.norm(x)) + self.emb_proj(F.silu(emb))
        return x + self.fc2(self.dropout(F.silu(h)))


class MLP(nn.Module):
    """Fully connected denoiser:  forward(x (B, C_in, H, W), t (B,), y (B,) | None) -> (B, C_out, H, W).

    Args:
        in_channels, out_channels, image_size: the data shape (C_in, H = W) and output channels.
        hidden_dim: width of the residual stream; also the time-embedding width.
        num_layers: number of residual blocks.
        dropout: dropout inside the blocks.
        num_classes: None for unconditional; otherwise ``num_classes + 1`` class embeddings, the last being
            the "null" class of classifier-free guidance (used when ``y`` is None).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: int,
        hidden_dim: int = 512,
        num_layers: int = 4,
        dropout: float = 0.0,
        num_classes: int | None = None,
    ):
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("image_size", image_size),
            ("hidden_dim", hidden_dim),
        ):
            if int(value) < 1:
                raise ValueError(f"MLP: {name} must be a positive integer, got {value}")
        if int(num_layers) < 0:
            raise ValueError(f"MLP: num_layers must be >= 0, got {num_layers}")
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"MLP: num_classes must be None (unconditional) or >= 1, got {num_classes}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.image_size = int(image_size)
        self.hidden_dim = int(hidden_dim)
        self.num_classes = None if num_classes is None else int(num_classes)
        pixels = self.image_size * self.image_size

        self.time_embed = nn.Sequential(
            nn.Linear(self.hidden_dim, self.hidden_dim),
            nn.SiLU(),
            nn.Linear(self.hidden_dim, self.hidden_dim),
        )
        self.label_embed = (
            nn.Embedding(self.num_classes + 1, self.hidden_dim) if self.num_classes is not None else None
        )
        self.inp = nn.Linear(self.in_channels * pixels, self.hidden_dim)
        self.blocks = nn.ModuleList(
            MLPBlock(self.hidden_dim, self.hidden_dim, dropout) for _ in range(int(num_layers))
        )
        self.out_norm = nn.LayerNorm(self.hidden_dim)
        self.out = nn.Linear(self.hidden_dim, self.out_channels * pixels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x: (B, C_in, H, W), t: (B,) int or float, y: (B,) int64 | None -> (B, C_out, H, W).

        ``y`` is ignored by an unconditional model. The tensors live on the weights' device (another device: a
        one-line ValueError); t may also be a number.
        """
        B = x.shape[0]
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"MLP: expected x of shape (B, {self.in_channels}, {self.image_size}, {self.image_size}), "
                f"got {tuple(x.shape)}; the MLP is built for one image size (set image_size)"
            )
        check_input_devices("MLP", self.inp.weight, x=x, t=t, y=y)
        t = torch.as_tensor(t, device=x.device)  # a number: made there; a tensor is there already
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"MLP: t must have shape ({B},) to match x, got {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.hidden_dim).to(self.inp.weight.dtype))
        if self.label_embed is not None:
            if y is None:
                y = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)
            if y.shape != (B,):
                raise ValueError(f"MLP: y must have shape ({B},) to match x, got {tuple(y.shape)}")
            emb = emb + self.label_embed(y.long())
        h = self.inp(x.flatten(1))  # (B, hidden)
        for block in self.blocks:
            h = block(h, emb)
        h = self.out(F.silu(self.out_norm(h)))  # (B, C_out * H * W)
        return h.reshape(B, self.out_channels, self.image_size, self.image_size)
