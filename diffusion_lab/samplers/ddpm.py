"""Ancestral sampling (Ho et al. 2020, "DDPM", Algorithm 2), with the diffusion's reverse variance.

    x_{t-1} = mu_theta(x_t, t) + sigma_t z,   z ~ N(0, I) for t > 1, z = 0 at the last step

mu_theta is the posterior mean mu_tilde(x0_hat, x_t) (DDPM Eq. 7) and sigma_t^2 the diffusion's variance
(fixed_small: beta_tilde_t, fixed_large: beta_t, learned: Improved DDPM Eq. 15), both from
``GaussianDiffusion.p_mean_variance``. On a respaced diffusion the same loop runs over the kept steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from diffusion_lab.processes.diffusion import GaussianDiffusion, ModelFn
from diffusion_lab.samplers.common import (
    Callback,
    check_x_T,
    full_steps,
    guided_model_output,
    make_x0_processor,
    randn_like,
    resolve_steps,
)
from diffusion_lab.utils.progress import track

__all__ = ["ddpm_sample"]


@torch.no_grad()
def ddpm_sample(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    steps: int | str | None = None,
    *,
    grid: str = "uniform",
    grid_opts: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    y: Tensor | None = None,
    guidance_scale: float = 1.0,
    clip_denoised: bool = True,
    dynamic_threshold: float | None = None,
    null_class: int | None = None,
) -> Tensor:
    """Draw x_0 ~ p_theta by ancestral sampling (DDPM Algorithm 2); one network evaluation per step.

    Args:
        model_fn: ``model_fn(x_t, t, y)`` -> (B, C or 2C, H, W).
        diffusion: the trained diffusion (its parameterization and variance decide the step).
        x_T: (B, C, H, W) starting noise, ~ N(0, I).
        steps: None = all T steps; n = respaced to n steps (Improved DDPM Sec. 4) placed by ``grid``.
        grid: a name in ``timesteps.GRIDS`` (default ``uniform``); grid_opts: its options.
        generator: the source of the per-step noise z (on x_T's device).
        callback: ``callback(i, t, x_t, pred_x0)`` once per step.
        y: (B,) class labels or None; guidance_scale: classifier-free guidance weight (1 = none).
        clip_denoised: clamp x0_hat to [-1, 1]; dynamic_threshold: Imagen percentile (replaces clipping).
        null_class: the label of the unconditional half of a guided batch (default ``model_fn.num_classes``).
    Returns:
        (B, C, H, W) samples.
    """
    check_x_T(x_T, diffusion)
    d = resolve_steps(diffusion, steps, grid, grid_opts)
    process_x0 = make_x0_processor(clip_denoised, dynamic_threshold)
    x = x_T
    M = d.num_timesteps
    for i, k in enumerate(track(reversed(range(M)), f"sampling (ddpm, {grid})", total=M)):
        t = full_steps(k, x)
        out = guided_model_output(model_fn, d, x, t, y, guidance_scale, null_class)
        p = d.p_mean_variance(out, x, t, clip_denoised=False, denoised_fn=process_x0)
        if callback is not None:
            callback(i, int(d.timestep_map[k]), x, p.pred_x0)
        if k > 0:
            x = p.mean + torch.exp(0.5 * p.log_variance) * randn_like(x, generator)
        else:  # DDPM Algorithm 2: no noise at the last step (mean = x0_hat there, as alpha_bar_0 = 1)
            x = p.mean
    return x
