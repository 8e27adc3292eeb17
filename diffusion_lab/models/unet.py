"""The DDPM / Improved DDPM U-Net (Ho et al. 2020, App. B; Nichol & Dhariwal 2021, Sec. 2 and App. A).

A plain noise-prediction network ``UNet(x, t, y=None) -> (B, out_channels, H, W)`` with no knowledge of the
diffusion: the caller decides what the output means (eps, x_0, v, and the variance channels when the
variance is learned, in which case it passes ``out_channels = 2 * in_channels``).

Layout (as in openai/improved-diffusion's ``UNetModel``), with ``L = len(channel_mult)`` levels:

    conv3x3 in
    for level in 0..L-1:   num_res_blocks x [ResBlock (+ attention)], then a 2x downsample (not at the last)
    middle:                ResBlock, attention, ResBlock
    for level in L-1..0:   (num_res_blocks + 1) x [concat skip, ResBlock (+ attention)], then a 2x upsample
                           (not after level 0)
    GroupNorm, SiLU, conv3x3 out (zero-initialised)

Every skip activation is stored on the way down and concatenated on the way up. Sizes that are not powers
of two (28 -> 14 -> 7 -> 4) are handled by stride-2 convolutions that round up and by upsampling to the
exact size of the skip that comes next.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.models.embeddings import timestep_embedding

__all__ = [
    "UNet",
    "ResBlock",
    "AttentionBlock",
    "Downsample",
    "Upsample",
    "group_norm",
    "GroupNorm",
    "attention_levels",
    "check_input_devices",
]

Size = Sequence[int] | None  # a target (H, W) for upsampling, or None for "twice as large"


def check_input_devices(name: str, weight: Tensor, **inputs: object) -> None:
    """One-line ValueError where an input tensor is not on the weights' device (a device comparison: no copy,
    no sync). Python numbers among ``inputs`` (a scalar t) and None are fine."""
    bad = [
        f"{k} on {v.device}" for k, v in inputs.items() if isinstance(v, Tensor) and v.device != weight.device
    ]
    if bad:
        raise ValueError(
            f"{name}: input {', '.join(bad)} but the weights on {weight.device}: put the model and its "
            "inputs on one device (model.to(device), x.to(device))"
        )


# devices whose group_norm kernel takes fp32 weight and bias beside a bf16 / fp16 input (CPU); elsewhere
# (CUDA) the kernel reads them in the input's dtype
_MIXED_DTYPE_DEVICES = ("cpu",)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that stays in its input's dtype under autocast.

    CUDA autocast puts ``group_norm`` on its fp32 list: under bf16-mixed every norm casts its bf16 input to
    fp32, and the fp32 output makes the SiLU, the FiLM and the residual adds that follow fp32 too, until the
    next convolution casts back (51 norms per unet_cifar forward). Here the norm runs on the input as it comes
    (autocast off for the call), with weight and bias in the input's dtype where the kernel wants them so. The
    kernels accumulate mean and variance in fp32 for a bf16 / fp16 input, on the CPU and on CUDA (``acc_type``
    of ``group_norm_kernel.cu``), so only the output is rounded to bf16: within one bf16 rounding of an fp64
    reference (tests/unit/test_group_norm.py).

    Outside autocast it is ``nn.GroupNorm`` itself: fp32 runs are bit for bit what they were.
    ``autocast_fp32 = True`` (``UNet(fp32_norm=True)``) keeps torch's autocast rule.
    """

    autocast_fp32: bool = False

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type
        if (
            self.autocast_fp32
            or not torch.amp.is_autocast_available(device)  # meta and other devices without autocast
            or not torch.is_autocast_enabled(device)
        ):
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if device not in _MIXED_DTYPE_DEVICES and weight is not None:
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        with torch.autocast(device, enabled=False):
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)


def group_norm(channels: int, max_groups: int = 32) -> GroupNorm:
    """:class:`GroupNorm` with the largest number of groups <= ``max_groups`` that divides ``channels``."""
    groups = max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)
    return GroupNorm(groups, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (the residual-branch outputs of Improved DDPM start at zero)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


def attention_levels(level_sizes: Sequence[int], resolutions: Sequence[int]) -> set[int]:
    """Levels that get self-attention.

    A requested resolution ``r`` selects the level whose feature-map size ``s`` satisfies ``s <= r < 2 s``
    (the largest such ``s`` if two qualify). On power-of-two images this is an exact match (32 -> 16 -> 8
    with ``[16]`` selects the 16 x 16 level); on 28-pixel images (28 -> 14 -> 7) ``[16]`` selects 14 x 14
    and ``[8]`` selects 7 x 7, so one config serves both. A resolution no level can reach is ignored.

    Args:
        level_sizes: feature-map size of each level, from the input resolution down.
        resolutions: requested feature-map sizes.
    """
    levels: set[int] = set()
    for r in resolutions:
        r = int(r)
        if r < 1:
            raise ValueError(f"attention_resolutions must be positive feature-map sizes, got {r}")
        matches = [i for i, s in enumerate(level_sizes) if s <= r < 2 * s]
        if matches:
            levels.add(min(matches))
    return levels


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 convolution, or average pooling when ``use_conv`` is False.

    Odd sizes round up (7 -> 4) in both cases, so the two variants always agree on the output size.
    """

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.op = conv3x3(channels, channels, stride=2) if use_conv else None

    def forward(self, x: Tensor, size: Size = None) -> Tensor:
        """(B, C, H, W) -> (B, C, ceil(H / 2), ceil(W / 2)); ``size`` is ignored."""
        if self.op is not None:
            return self.op(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)


class Upsample(nn.Module):
    """2x nearest-neighbour upsampling (to ``size`` when given), then a 3x3 convolution if ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.conv = conv3x3(channels, channels) if use_conv else None

    def forward(self, x: Tensor, size: Size = None) -> Tensor:
        """(B, C, H, W) -> (B, C, *size), or (B, C, 2H, 2W) when ``size`` is None."""
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(int(s) for s in size), mode="nearest")
        return x if self.conv is None else self.conv(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the (time + class) embedding  (DDPM App. B; Improved DDPM App. A).

        h = conv(SiLU(GN(x)))
        h = GN(h) (1 + scale) + shift       if use_scale_shift_norm ([scale, shift] = Linear(SiLU(emb)))
        h = GN(h + Linear(SiLU(emb)))       otherwise (DDPM)
        out = skip(x) + conv_zero(Dropout(SiLU(h)))

    ``skip`` is the identity, or a 1x1 convolution when the channel count changes. With ``up``/``down``
    the block also resamples (BigGAN style, Improved DDPM's ``resblock_updown``), both branches before
    the first convolution.
    """

    def __init__(
        self,
        in_channels: int,
        emb_dim: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = group_norm(in_channels)
        self.in_conv = conv3x3(in_channels, out_channels)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.out_norm = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(conv3x3(out_channels, out_channels))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        if up and down:
            raise ValueError("ResBlock: choose at most one of up=True and down=True")
        self.resample: nn.Module | None = None
        if up:
            self.resample = Upsample(in_channels, use_conv=False)
        elif down:
            self.resample = Downsample(in_channels, use_conv=False)

    def forward(self, x: Tensor, emb: Tensor, size: Size = None) -> Tensor:
        """x: (B, C_in, H, W), emb: (B, emb_dim) -> (B, C_out, H', W'); ``size`` is the upsampling target."""
        h = F.silu(self.in_norm(x))
        if self.resample is not None:
            h, x = self.resample(h, size), self.resample(x, size)
        h = self.in_conv(h)
        e = self.emb_proj(F.silu(emb)).to(h.dtype)[:, :, None, None]  # (B, C_out or 2 C_out, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1.0 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection.

        q, k, v = split(W_qkv GN(x))                       (per head, d = C / heads channels)
        out = x + W_o softmax(q k^T / sqrt(d)) v

    computed with :func:`torch.nn.functional.scaled_dot_product_attention`. ``W_o`` starts at zero.

    Args:
        channels: C.
        num_heads: number of heads (used when ``num_head_channels`` is -1).
        num_head_channels: channels per head; when not -1 it fixes the head width instead of the count.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1):
        super().__init__()
        if num_head_channels == -1:
            heads = num_heads
        else:
            if num_head_channels < 1 or channels % num_head_channels:
                raise ValueError(
                    f"num_head_channels={num_head_channels} must divide the {channels} channels of an "
                    "attention layer; pick a divisor or set num_head_channels=-1 and use num_heads"
                )
            heads = channels // num_head_channels
        if heads < 1 or channels % heads:
            raise ValueError(
                f"num_heads={heads} must divide the {channels} channels of an attention layer; pick a divisor"
            )
        self.num_heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv1d(channels, channels, 1))

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, C, H, W) -> q, k, v, each (B, heads, H*W, d) with unit stride along d.

        The unit stride matters on the CPU: ``scaled_dot_product_attention`` takes its fused (flash) kernel
        only then and otherwise falls back to the unfused math (``make bench``, "profile" section).
        """
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x).reshape(B, C, H * W))  # (B, 3C, T)
        qkv = qkv.reshape(B, 3 * self.num_heads, C // self.num_heads, H * W)  # (B, 3 heads, d, T)
        qkv = qkv.transpose(-1, -2).contiguous()  # (B, 3 heads, T, d): one copy for q, k and v
        q, k, v = qkv.reshape(B, 3, self.num_heads, H * W, C // self.num_heads).unbind(dim=1)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        q, k, v = self.qkv_heads(x)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d)
        a = a.transpose(-1, -2).reshape(B, C, H * W)  # (B, C, T)
        return x + self.proj(a).reshape(B, C, H, W)


class EmbedSequential(nn.Sequential):
    """A sequence of layers; residual blocks also receive the embedding, resamplers the target size."""

    def forward(self, x: Tensor, emb: Tensor, size: Size = None) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, size)
            elif isinstance(layer, (Upsample, Downsample)):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """DDPM / Improved DDPM U-Net:  forward(x (B, C_in, H, W), t (B,), y (B,) | None) -> (B, C_out, H, W).

    Args:
        in_channels: data channels.
        out_channels: output channels (the caller doubles them when the variance is learned).
        image_size: height = width of the inputs the network is built for (sets the attention levels; other
            sizes still run).
        channels: base width; level ``i`` has ``channels * channel_mult[i]`` channels. The time embedding
            has ``4 * channels`` dimensions (DDPM).
        channel_mult: width multiplier per level; ``len(channel_mult) - 1`` downsamplings.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: feature-map sizes that get self-attention (see :func:`attention_levels`); the
            middle block always has one.
        dropout: dropout inside residual blocks.
        num_heads: attention heads (when ``num_head_channels`` is -1).
        num_head_channels: channels per attention head, or -1 to use ``num_heads``.
        num_classes: None for an unconditional model; otherwise a class embedding with ``num_classes + 1``
            rows is added to the time embedding, row ``num_classes`` being the "null" class of classifier-free
            guidance (used when ``y`` is None).
        use_scale_shift_norm: condition residual blocks by FiLM on the normalised activations (Improved
            DDPM) instead of adding the embedding before the norm (DDPM).
        resblock_updown: resample with residual blocks (BigGAN style) instead of strided conv /
            nearest + conv.
        fp32_norm: under autocast, run the GroupNorms in fp32 as torch's CUDA autocast does (a cast to fp32
            and, from channels_last, a copy to NCHW per norm); False: in the activations' dtype
            (:class:`GroupNorm`). Outside autocast the two are the same.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: int,
        channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        num_heads: int = 4,
        num_head_channels: int = -1,
        num_classes: int | None = None,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        fp32_norm: bool = False,
    ):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("image_size", image_size),
            ("channels", channels),
            ("num_res_blocks", num_res_blocks),
        ):
            if int(value) < 1:
                raise ValueError(f"UNet: {name} must be a positive integer, got {value}")
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"UNet: channel_mult must list positive ints, got {channel_mult}")
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"UNet: num_classes must be None (unconditional) or >= 1, got {num_classes}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.num_classes = None if num_classes is None else int(num_classes)

        level_sizes = [self.image_size]
        for _ in channel_mult[1:]:
            level_sizes.append((level_sizes[-1] + 1) // 2)
        self.level_sizes = level_sizes
        self.attention_levels = sorted(attention_levels(level_sizes, attention_resolutions))

        emb_dim = 4 * self.channels
        # DDPM: sinusoid -> Linear -> SiLU -> Linear, width 4 * channels.
        self.time_embed = nn.Sequential(
            nn.Linear(self.channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.label_embed = None
        if self.num_classes is not None:
            self.label_embed = nn.Embedding(self.num_classes + 1, emb_dim)  # row num_classes = null class

        def res(c_in: int, c_out: int, **kw) -> ResBlock:
            return ResBlock(c_in, emb_dim, dropout, c_out, use_scale_shift_norm, **kw)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, num_heads, num_head_channels)

        ch = self.channels
        self.input_blocks = nn.ModuleList([EmbedSequential(conv3x3(self.in_channels, ch))])
        skip_channels = [ch]
        last = len(channel_mult) - 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * self.channels)]
                ch = mult * self.channels
                if level in self.attention_levels:
                    layers.append(attn(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch)
                self.input_blocks.append(EmbedSequential(down))
                skip_channels.append(ch)

        self.middle_block = EmbedSequential(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * self.channels)]
                ch = mult * self.channels
                if level in self.attention_levels:
                    layers.append(attn(ch))
                if level != 0 and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch))
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_module(conv3x3(ch, self.out_channels)))
        self.fp32_norm = bool(fp32_norm)
        for m in self.modules():
            if isinstance(m, GroupNorm):
                m.autocast_fp32 = self.fp32_norm

    def embed(self, t: Tensor, y: Tensor | None, batch: int) -> Tensor:
        """Time (+ class) embedding, (B, 4 * channels); t (B,) on the weights' device, or a number."""
        t = torch.as_tensor(t, device=self.time_embed[0].weight.device)  # a number is made there
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"UNet: t must have shape ({batch},) to match x, got {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.channels).to(self.time_embed[0].weight.dtype))
        if self.label_embed is not None:
            if y is None:
                y = torch.full((batch,), self.num_classes, dtype=torch.long, device=emb.device)
            if y.shape != (batch,):
                raise ValueError(f"UNet: y must have shape ({batch},) to match x, got {tuple(y.shape)}")
            emb = emb + self.label_embed(y.long())
        return emb

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict from a noisy batch.

        Args:
            x: (B, in_channels, H, W), on the weights' device (another device: a one-line ValueError).
            t: (B,) timesteps, int64 or float (0-based; the network only sees their sinusoidal embedding), on
                the weights' device too, or a number.
            y: (B,) int64 class labels in [0, num_classes], ``num_classes`` meaning "no class"; None gives
                the null class. Ignored by an unconditional model (``num_classes=None``).

        Returns:
            (B, out_channels, H, W).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet: expected x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        check_input_devices("UNet", self.time_embed[0].weight, x=x, t=t, y=y)
        emb = self.embed(t, y, x.shape[0])
        hs: list[Tensor] = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = block(h, emb, hs[-1].shape[-2:] if hs else None)
        return self.out(h)
