"""Diffusion Transformer with adaLN-Zero (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

A plain backbone ``DiT(x, t, y=None) -> (B, out_channels, H, W)`` with the U-Net's contract (see
``models/unet.py``): the caller passes ``out_channels = 2 * in_channels`` when the variance is learned (the
paper's ``learn_sigma``), and label ``num_classes`` is the null class of classifier-free guidance.

    x (B, C, H, W) --patchify p--> tokens (B, T, D) + fixed 2-D sin-cos positions,   T = (H / p) (W / p)
    c = MLP(sinusoid_256(t)) + Embed(y)                                              (B, D)
    depth x DiT block (adaLN-Zero, Sec. 3.2):
        shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c))               6 x (B, D)
        h = h + gate1 * Attn(LN(h) (1 + scale1) + shift1)
        h = h + gate2 * MLP(LN(h) (1 + scale2) + shift2)
    final layer: shift, scale = Linear(SiLU(c));  Linear(LN(h) (1 + scale) + shift) -> (B, T, p p C_out)
    unpatchify -> (B, C_out, H, W)

Initialisation (paper Sec. 3.2 and App. A; facebookresearch/DiT ``initialize_weights``): every Linear Xavier
uniform with zero bias, the patch embedding Xavier uniform as a Linear on the flattened patch, timestep MLP
and label table N(0, 0.02^2), and the adaLN modulations and the final projection zero, so each block starts
as the identity and the network outputs exactly zero.

Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels on CPU and
GPU). Label dropout for classifier-free guidance is the training module's job (``cond_drop_prob``), as for
the U-Net, so the network holds no randomness.

Position table versions. The fixed table is kept out of the state_dict, so the weights carry its layout as
the integer buffer ``pos_embed_version``:

    2 (current): MAE / DiT's table, the first hidden_size / 2 channels encode the column, the rest the row.
    1: earlier versions of this module, the two halves swapped (row first). Their checkpoints hold no
       ``pos_embed_version``; loading one sets version 1 and rebuilds the table they were trained with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.models.embeddings import timestep_embedding
from diffusion_lab.models.unet import check_input_devices

__all__ = ["DiT", "DiTBlock", "FinalLayer", "patchify", "unpatchify", "sincos_pos_embed_2d", "modulate"]

FREQUENCY_DIM = 256  # width of the timestep sinusoid before the MLP (paper's TimestepEmbedder)
POS_EMBED_VERSION = 2  # layout of the position table, see the module docstring


# ------------------------------------------------------------------------------------------ tokens


def patchify(x: Tensor, p: int) -> Tensor:
    """Cut images into non-overlapping p x p patches, row-major over the patch grid.

    Args:
        x: (B, C, H, W) with H and W multiples of p.
    Returns:
        (B, T, p * p * C), T = (H / p) (W / p); each token is flattened in (p_row, p_col, C) order, the layout
        :func:`unpatchify` expects and the one :class:`DiT`'s final layer produces.
    """
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"patchify: image size {H}x{W} is not a multiple of the patch size {p}")
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(tokens: Tensor, p: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`patchify`: (B, h w, p p C) -> (B, C, h p, w p)."""
    B, T, D = tokens.shape
    if T != h * w or D % (p * p):
        raise ValueError(f"unpatchify: {T} tokens of width {D} do not form a {h}x{w} grid of {p}x{p} patches")
    C = D // (p * p)
    x = tokens.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, C, h * p, w * p)


def sincos_pos_embed_1d(dim: int, pos: Tensor) -> Tensor:
    """(N,) positions -> (N, dim): [sin(pos omega_i), cos(pos omega_i)], omega_i = 10000^(-i / (dim / 2))."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))  # (dim / 2,)
    out = pos.to(torch.float64)[:, None] * omega[None]  # (N, dim / 2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, h: int, w: int, rows_first: bool = False) -> Tensor:
    """Fixed 2-D sin-cos position embedding of an h x w grid (MAE / DiT): (h w, dim) float32.

    Token k sits at row k // w, column k % w (row-major, as :func:`patchify`). Channels [0, dim / 2) hold
    :func:`sincos_pos_embed_1d` of the column, channels [dim / 2, dim) that of the row:

        pe[k] = [sin(col omega), cos(col omega), sin(row omega), cos(row omega)]   (dim / 4 values each)
        omega_i = 10000^(-i / (dim / 4)),  i = 0, ..., dim / 4 - 1

    the layout of MAE's ``get_2d_sincos_pos_embed`` (its ``meshgrid(grid_w, grid_h)`` puts the column in
    ``grid[0]``, which fills the first half) and so of facebookresearch/DiT. ``rows_first`` swaps the halves:
    the table of this module's version 1 (see the module docstring). ``dim`` must be a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: hidden_size must be a multiple of 4, got {dim}")
    rows = torch.arange(h).repeat_interleave(w)  # (h w,) row of each token
    cols = torch.arange(w).repeat(h)  # (h w,) column of each token
    first, second = (rows, cols) if rows_first else (cols, rows)
    emb = torch.cat([sincos_pos_embed_1d(dim // 2, first), sincos_pos_embed_1d(dim // 2, second)], dim=1)
    return emb.float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, T, D) * (1 + scale (B, D)) + shift (B, D), the same affine map for every token."""
    return x * (1.0 + scale[:, None]) + shift[:, None]


# ------------------------------------------------------------------------------------------ blocks


class Attention(nn.Module):
    """Multi-head self-attention over the tokens: qkv projection with bias, SDPA, output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"DiT: num_heads={num_heads} must divide hidden_size={dim}; pick a divisor")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, T, d) each
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d)
        return self.proj(a.transpose(1, 2).reshape(B, T, D))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (Peebles & Xie 2023, Sec. 3.2, Fig. 3).

    LayerNorms without affine parameters; the conditioning regresses a shift, scale and gate for each of the
    two sub-layers. The modulation Linear starts at zero, so every gate is zero and the block is the identity.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x: (B, T, D) tokens, c: (B, D) conditioning -> (B, T, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # (B, D)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift and scale, no gate), then a Linear to p p C_out values per token; both start at zero."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x: (B, T, D), c: (B, D) -> (B, T, p p C_out)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


# ------------------------------------------------------------------------------------------ network


class DiT(nn.Module):
    """Diffusion Transformer:  forward(x (B, C_in, H, W), t (B,), y (B,) | None) -> (B, C_out, H, W).

    Args:
        in_channels: data channels.
        out_channels: output channels (the caller doubles them when the variance is learned).
        image_size: height = width the network is built for (sets the stored position table; other sizes that
            are multiples of ``patch_size`` run with a freshly computed one).
        patch_size: p; the image becomes (image_size / p)^2 tokens.
        hidden_size: token width D (DiT-S 384, DiT-B 768, DiT-L 1024, DiT-XL 1152).
        depth: number of DiT blocks (12 for S and B).
        num_heads: attention heads (S 6, B 12).
        mlp_ratio: MLP width over D.
        num_classes: None for an unconditional model; otherwise a label table with ``num_classes + 1`` rows,
            row ``num_classes`` being the null class of classifier-free guidance (used when ``y`` is None).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: int,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,
    ):
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("image_size", image_size),
            ("patch_size", patch_size),
            ("hidden_size", hidden_size),
            ("depth", depth),
        ):
            if int(value) < 1:
                raise ValueError(f"DiT: {name} must be a positive integer, got {value}")
        if image_size % patch_size:
            raise ValueError(
                f"DiT: image_size {image_size} is not a multiple of patch_size {patch_size}; "
                "pick a patch size that divides it (e.g. model.patch_size=2)"
            )
        if hidden_size % 4:
            raise ValueError(f"DiT: hidden_size must be a multiple of 4 (2-D positions), got {hidden_size}")
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"DiT: num_classes must be None (unconditional) or >= 1, got {num_classes}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.image_size = int(image_size)
        self.patch_size = p = int(patch_size)
        self.hidden_size = D = int(hidden_size)
        self.num_classes = None if num_classes is None else int(num_classes)

        # a convolution with kernel = stride = p is a Linear on each flattened patch
        self.patch_embed = nn.Conv2d(self.in_channels, D, kernel_size=p, stride=p)
        grid = self.image_size // p
        # fixed, derived from the config: a buffer left out of the state_dict; its layout version is saved
        self.pos_rows_first = False
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, grid, grid)[None], persistent=False)
        self.register_buffer("pos_embed_version", torch.tensor(POS_EMBED_VERSION), persistent=True)
        self.register_load_state_dict_pre_hook(DiT._load_pos_embed_version)
        self.time_embed = nn.Sequential(nn.Linear(FREQUENCY_DIM, D), nn.SiLU(), nn.Linear(D, D))
        self.label_embed = None
        if self.num_classes is not None:
            self.label_embed = nn.Embedding(self.num_classes + 1, D)  # row num_classes = null class
        self.blocks = nn.ModuleList([DiTBlock(D, int(num_heads), mlp_ratio) for _ in range(int(depth))])
        self.final_layer = FinalLayer(D, p, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The paper's initialisation (reference: DiT ``initialize_weights``), see the module docstring."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight  # (D, C, p, p): Xavier as for a Linear of fan-in C p p
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.time_embed[0], self.time_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        # adaLN-Zero: gates (and shifts / scales) start at zero, so does the output
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _load_pos_embed_version(self, state_dict: dict, prefix: str, *args) -> None:
        """Load-state-dict pre-hook: a state without ``pos_embed_version`` predates version 2 (rows first)."""
        key = prefix + "pos_embed_version"
        if key not in state_dict:
            state_dict[key] = torch.tensor(1)  # the caller's dict is not touched: load_state_dict copies it
        version = int(state_dict[key])
        if version not in (1, 2):
            raise ValueError(
                f"DiT: unknown pos_embed_version {version} in the state_dict (this code knows 1, 2)"
            )
        self.pos_rows_first = version == 1
        grid = self.image_size // self.patch_size
        table = sincos_pos_embed_2d(self.hidden_size, grid, grid, rows_first=self.pos_rows_first)
        with torch.no_grad():
            self.pos_embed.copy_(table[None])

    def embed(self, t: Tensor, y: Tensor | None, batch: int) -> Tensor:
        """Conditioning c = time embedding (+ label embedding), (B, hidden_size)."""
        weight = self.time_embed[0].weight
        t = torch.as_tensor(t, device=weight.device)  # a Python number; tensors were checked in forward
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"DiT: t must have shape ({batch},) to match x, got {tuple(t.shape)}")
        c = self.time_embed(timestep_embedding(t, FREQUENCY_DIM).to(weight.dtype))
        if self.label_embed is not None:
            if y is None:
                y = torch.full((batch,), self.num_classes, dtype=torch.long, device=c.device)
            if y.shape != (batch,):
                raise ValueError(f"DiT: y must have shape ({batch},) to match x, got {tuple(y.shape)}")
            c = c + self.label_embed(y.long())
        return c

    def positions(self, h: int, w: int, like: Tensor) -> Tensor:
        """(1, h w, D) position table: the stored one for the built size, a fresh one otherwise."""
        if h * w == self.pos_embed.shape[1] and h == w == self.image_size // self.patch_size:
            return self.pos_embed
        return sincos_pos_embed_2d(self.hidden_size, h, w, self.pos_rows_first).to(like.device)[None]

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict from a noisy batch.

        Args:
            x: (B, in_channels, H, W), H and W multiples of patch_size.
            t: (B,) timesteps, int64 or float (the network only sees their sinusoidal embedding).
            y: (B,) int64 labels in [0, num_classes], ``num_classes`` meaning "no class"; None gives the null
                class. Ignored by an unconditional model (``num_classes=None``).

        Returns:
            (B, out_channels, H, W).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"DiT: expected x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        check_input_devices("DiT", self.patch_embed.weight, x=x, t=t, y=y)
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"DiT: input size {H}x{W} is not a multiple of patch_size {p}")
        h, w = H // p, W // p
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, T, D), row-major over the grid
        tokens = tokens + self.positions(h, w, tokens)
        c = self.embed(t, y, B)  # (B, D)
        for block in self.blocks:
            tokens = block(tokens, c)
        return unpatchify(self.final_layer(tokens, c), p, h, w)  # (B, C_out, H, W)
