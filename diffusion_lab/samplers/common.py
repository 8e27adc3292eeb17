"""Pieces every sampler shares: step selection, guided network calls, x_0 post-processing, NFE counting.

Every sampler in this package has one signature (k-diffusion style, randomness injected):

    sample_fn(model_fn, diffusion, x_T, steps=None, *, grid=..., grid_opts=None, generator=None,
              callback=None, y=None, guidance_scale=1.0, clip_denoised=True, dynamic_threshold=None,
              null_class=None, **sampler_specific) -> x_0   (B, C, H, W)

    model_fn(x_t, t, y) -> network output, (B, C or 2C, H, W); ``t`` is the original training step.
    steps, grid         n network evaluations at the steps ``timesteps.make_grid(grid, diffusion, steps)``
                        (None = all T steps); the diffusion is respaced to them (Improved DDPM Sec. 4: betas
                        rebuilt from the kept alpha-bars). Defaults: uniform (ddpm, ddim), logsnr_uniform
                        (dpm_solver).
    callback(i, t, x_t, pred_x0)  once per network evaluation: i = 0, 1, ...; t = the original training
                        step (int); x_t = the state the network saw; pred_x0 = its (clipped) x_0 estimate.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from diffusion_lab.processes.diffusion import GaussianDiffusion, ModelFn
from diffusion_lab.samplers.timesteps import make_grid

__all__ = [
    "Callback",
    "NFECounter",
    "resolve_steps",
    "guided_model_output",
    "dynamic_thresholding",
    "make_x0_processor",
    "check_x_T",
    "randn_like",
    "full_steps",
]

Callback = Callable[[int, int, Tensor, Tensor], Any]  # callback(i, t, x_t, pred_x0)


class NFECounter:
    """Wrap a ``model_fn`` and count its calls: ``counter.nfe`` network function evaluations.

    A classifier-free-guided step is one batched call of 2B examples and counts once (as in the
    DPM-Solver papers, which count steps, not examples). Attributes not defined here (``num_classes``,
    ``training``, ...) are read from the wrapped model.
    """

    def __init__(self, model_fn: ModelFn):
        self.model_fn = model_fn
        self.nfe = 0

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        self.nfe += 1
        return self.model_fn(x_t, t, y)

    def __getattr__(self, name: str):
        if name == "model_fn":  # not yet set (e.g. during unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.model_fn, name)


def resolve_steps(
    diffusion: GaussianDiffusion,
    steps: int | str | None,
    grid: str = "uniform",
    grid_opts: Mapping[str, Any] | None = None,
) -> GaussianDiffusion:
    """The diffusion to sample on: ``diffusion`` itself for all T steps, else respaced to the grid's steps.

    Respacing keeps alpha_bar at the grid's steps and rebuilds the betas from them (Improved DDPM Sec. 4), for
    any grid, so every sampler runs its own loop over the kept steps unchanged.

    Args:
        steps: None (all steps), an int n (network evaluations), a section list "10,10,5" (grid uniform), or
            ``"ddimN"`` (DDIM's stride, read as grid ``leading`` with n = N).
        grid: a name in ``timesteps.GRIDS``; grid_opts: its options (e.g. ``{"rho": 7}`` for karras).
    """
    if isinstance(steps, str) and steps.startswith("ddim"):
        n = steps[4:]
        if not n.isdigit():
            raise ValueError(
                f"steps='{steps}': write DDIM's stride as grid=leading steps=N, e.g. steps=ddim50"
            )
        if grid != "leading":
            warnings.warn(
                f"steps='{steps}' is DDIM's strided grid: sampling with grid=leading, steps={n} "
                f"(write sampler.grid=leading sampler.steps={n})",
                stacklevel=3,
            )
        steps, grid = int(n), "leading"
    keep = make_grid(grid, diffusion, steps, **dict(grid_opts or {}))
    if len(keep) == diffusion.num_timesteps:
        return diffusion
    return diffusion.respace(keep.tolist())


def _null_labels(y: Tensor, null_class: int | None, model_fn: ModelFn) -> Tensor | None:
    """Labels of the unconditional half of a guided batch, or None where the null class is unknown."""
    if null_class is None:
        null_class = getattr(model_fn, "num_classes", None)
    if null_class is None or not isinstance(null_class, int):
        return None
    return torch.full_like(y, null_class)


def guided_model_output(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_t: Tensor,
    t: Tensor,
    y: Tensor | None = None,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
) -> Tensor:
    """The network output at (x_t, t), with classifier-free guidance (Ho & Salimans 2022, Eq. 6).

        out = out_uncond + s (out_cond - out_uncond)        on the prediction channels

    The prediction channels (eps, x_0 or v) are affine in one another at fixed (x_t, t), with weights
    that sum to one here, so guiding any of them gives the same sampler step. Learned-variance channels
    are taken from the conditional half (as GLIDE does).

    The conditional and unconditional halves run as one batch of 2B examples when the null label is known:
    ``null_class``, else ``model_fn.num_classes`` (the model contract puts the null class at index
    num_classes). Otherwise the unconditional half is a second call with ``y=None``.

    Args:
        x_t: (B, C, H, W); t: (B,) int64 steps of ``diffusion`` (mapped through its ``timestep_map``).
        y: (B,) int64 class labels or None (then no guidance is possible and the call is unconditional).
    Returns:
        (B, C or 2C, H, W).
    """
    if y is None or guidance_scale == 1.0:
        return diffusion.run_model(model_fn, x_t, t, y)
    C = x_t.shape[1]
    y_null = _null_labels(y, null_class, model_fn)
    if y_null is not None:
        out = diffusion.run_model(model_fn, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, y_null]))
        out_cond, out_uncond = out.chunk(2)
    else:
        out_cond = diffusion.run_model(model_fn, x_t, t, y)
        out_uncond = diffusion.run_model(model_fn, x_t, t, None)
    guided = out_uncond[:, :C] + guidance_scale * (out_cond[:, :C] - out_uncond[:, :C])
    return torch.cat([guided, out_cond[:, C:]], dim=1)


def dynamic_thresholding(x0: Tensor, percentile: float) -> Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3), per example.

        s = max(1, quantile_p(|x0|));   x0 <- clamp(x0, -s, s) / s

    Args:
        x0: (B, C, H, W) predicted data.
        percentile: p in (0, 1], e.g. 0.995.
    Returns:
        (B, C, H, W) within [-1, 1]; unchanged where the p-quantile of |x0| is <= 1.
    """
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"dynamic_threshold is a percentile in (0, 1] (e.g. 0.995), got {percentile}")
    B = x0.shape[0]
    flat = x0.detach().abs().reshape(B, -1).float()
    s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.reshape(B, *([1] * (x0.ndim - 1)))  # (B, 1, 1, 1)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def make_x0_processor(
    clip_denoised: bool, dynamic_threshold: float | None
) -> Callable[[Tensor], Tensor] | None:
    """The map applied to every x_0 prediction: dynamic thresholding if given, else clipping to [-1, 1].

    Dynamic thresholding replaces static clipping (clipping first would leave it nothing to do).
    Returns None when neither is asked for.
    """
    if dynamic_threshold is not None:
        p = float(dynamic_threshold)
        dynamic_thresholding(torch.zeros(1, 1), p)  # validate once, up front
        return lambda x0: dynamic_thresholding(x0, p)
    if clip_denoised:
        return lambda x0: x0.clamp(-1.0, 1.0)
    return None


def check_x_T(x_T: Tensor, diffusion: GaussianDiffusion) -> None:
    """Raise a clear error for an x_T the samplers cannot use."""
    if not isinstance(x_T, Tensor) or x_T.ndim < 2:
        raise ValueError("x_T must be a tensor of shape (B, C, ...), e.g. torch.randn(B, C, H, W)")
    if not x_T.is_floating_point():
        raise ValueError(f"x_T must be a floating-point tensor, got {x_T.dtype}")
    if not isinstance(diffusion, GaussianDiffusion):
        raise ValueError(f"diffusion must be a GaussianDiffusion, got {type(diffusion).__name__}")


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """z ~ N(0, I) shaped like x, drawn from ``generator`` (which must live on x's device)."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def full_steps(k: int, x: Tensor) -> Tensor:
    """(B,) int64 tensor of step k on x's device."""
    return torch.full((x.shape[0],), k, device=x.device, dtype=torch.long)
