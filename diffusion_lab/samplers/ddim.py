"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models").

From x_t at step k to the previous kept step (alpha_bar' = alpha_bar_prev of the (respaced) chain):

    x_{t-1} = sqrt(alpha_bar') x0_hat + sqrt(1 - alpha_bar' - sigma^2) eps_hat + sigma z      (DDIM Eq. 12)
    sigma   = eta sqrt((1 - alpha_bar') / (1 - alpha_bar)) sqrt(1 - alpha_bar / alpha_bar')    (DDIM Eq. 16)

eta = 0 is the deterministic DDIM; eta = 1 gives sigma^2 = beta_tilde_t, and the step is then exactly the
DDPM step with fixed-small variance (the mean sqrt(alpha_bar') x0 + sqrt(1 - alpha_bar' - beta_tilde) eps
equals mu_tilde(x0, x_t) of DDPM Eq. 7). At the last step alpha_bar' = 1, sigma = 0 and x = x0_hat.
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

__all__ = ["ddim_sample", "ddim_coefficients"]


def ddim_coefficients(diffusion: GaussianDiffusion, eta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step DDIM coefficients in float64, each (T,) over the diffusion's own (possibly respaced) steps.

    Returns:
        (sqrt(alpha_bar'), sqrt(1 - alpha_bar' - sigma^2), sigma) for DDIM Eq. 12 with sigma of Eq. 16.
    """
    ab = diffusion.schedule.alphas_cumprod.to(torch.float64)  # alpha_bar_t
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])  # alpha_bar' (1 before the first step)
    # DDIM Eq. 16; with ab = 0 (zero terminal SNR) the first factor is (1 - ab') / 1, still finite.
    sigma = eta * torch.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
    dir_coef = torch.sqrt((1.0 - ab_prev - sigma**2).clamp(min=0.0))
    return ab_prev.sqrt(), dir_coef, sigma


@torch.no_grad()
def ddim_sample(
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
    eta: float = 0.0,
) -> Tensor:
    """Draw x_0 with DDIM (DDIM Eq. 12, sigma from Eq. 16); one network evaluation per step.

    Args:
        model_fn, diffusion, x_T, steps, grid, grid_opts, generator, callback, y, guidance_scale,
        clip_denoised, dynamic_threshold, null_class: as for every sampler (see ``samplers.common``);
        grid defaults to ``uniform``.
        eta: in [0, 1]; 0 = deterministic DDIM, 1 = DDPM's ancestral step with fixed-small variance.
            Learned-variance channels are ignored (DDIM sets its own sigma).
    Returns:
        (B, C, H, W) samples.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")
    check_x_T(x_T, diffusion)
    d = resolve_steps(diffusion, steps, grid, grid_opts)
    process_x0 = make_x0_processor(clip_denoised, dynamic_threshold)
    sqrt_ab_prev, dir_coef, sigma = (c.to(x_T.device, x_T.dtype) for c in ddim_coefficients(d, eta))
    x = x_T
    M = d.num_timesteps
    for i, k in enumerate(track(reversed(range(M)), f"sampling (ddim, {grid})", total=M)):
        t = full_steps(k, x)
        out = guided_model_output(model_fn, d, x, t, y, guidance_scale, null_class)
        # x0_hat and the eps_hat consistent with it (recomputed from x0_hat after clipping)
        p = d.p_mean_variance(out, x, t, clip_denoised=False, denoised_fn=process_x0)
        if callback is not None:
            callback(i, int(d.timestep_map[k]), x, p.pred_x0)
        x_prev = sqrt_ab_prev[k] * p.pred_x0 + dir_coef[k] * p.pred_eps  # DDIM Eq. 12
        if k > 0 and eta > 0:
            x_prev = x_prev + sigma[k] * randn_like(x, generator)
        x = x_prev
    return x
