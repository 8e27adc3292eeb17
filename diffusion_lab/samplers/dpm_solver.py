"""DPM-Solver++(2M) (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", Algorithm 2): a multistep second-order solver of the probability-flow ODE in data
(x_0) prediction, on the discrete schedule.

Notation: alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t)
(half the log-SNR), x_theta = the network's x_0 prediction (clipped / thresholded, Sec. 4 of the paper),
and h_i = lambda_{t_i} - lambda_{t_{i-1}} for the decreasing times t_0 > t_1 > ... > t_M.

    first order (DPM-Solver++1 = DDIM with eta = 0; DPM-Solver++ Eq. 8):
        x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) x_theta(t_{i-1})
    second order multistep (Algorithm 2), r_i = h_{i-1} / h_i:
        D_i     = (1 + 1 / (2 r_i)) x_theta(t_{i-1}) - 1 / (2 r_i) x_theta(t_{i-2})
        x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i

The network is evaluated at the M discrete steps t_0 > ... > t_{M-1} of a timestep grid
(``timesteps.py``; default ``logsnr_uniform``, uniform in lambda, as in DPM-Solver Sec. 3.3), the first
step is first order (no history yet), and the last step goes to clean data, t_M with sigma = 0
(lambda = +inf). That last step is first order (diffusers' ``lower_order_final`` with
``final_sigmas_type="zero"``): with sigma_{t_M} = 0 and e^{-h} = 0 it returns x_theta(t_{M-1}) exactly.
NFE = M.
"""

from __future__ import annotations

import math
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
    resolve_steps,
)
from diffusion_lab.samplers.timesteps import half_log_snr
from diffusion_lab.utils.progress import track

__all__ = ["dpm_solver_sample"]


@torch.no_grad()
def dpm_solver_sample(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    steps: int | str | None = None,
    *,
    grid: str = "logsnr_uniform",
    grid_opts: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    y: Tensor | None = None,
    guidance_scale: float = 1.0,
    clip_denoised: bool = True,
    dynamic_threshold: float | None = None,
    null_class: int | None = None,
    order: int = 2,
) -> Tensor:
    """Draw x_0 with DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2); ``steps`` network evaluations.

    Args:
        model_fn, diffusion, x_T, callback, y, guidance_scale, clip_denoised, dynamic_threshold,
        null_class: as for every sampler (see ``diffusion_lab.samplers.common``).
        steps: the number of network evaluations M (None = all T steps).
        grid: where they go, a name in ``timesteps.GRIDS`` (default ``logsnr_uniform``); grid_opts: its
            options.
        generator: unused (the solver is deterministic); accepted for the shared signature.
        order: 2 = DPM-Solver++(2M); 1 = DPM-Solver++1 (identical to DDIM with eta = 0).
    Returns:
        (B, C, H, W) samples.
    """
    del generator  # deterministic
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2 (DPM-Solver++ 1 or 2M), got {order}")
    check_x_T(x_T, diffusion)
    d = resolve_steps(diffusion, steps, grid, grid_opts)
    process_x0 = make_x0_processor(clip_denoised, dynamic_threshold)

    # float64 tables over the kept steps k = 0..M-1; the network runs at k = M-1, ..., 0, then to clean data.
    ab = d.schedule.alphas_cumprod.to(torch.float64)
    alpha, sigma, lam = ab.sqrt(), (1.0 - ab).sqrt(), half_log_snr(ab)

    x = x_T
    x0_prev, h_prev = None, None
    M = d.num_timesteps
    for i, k in enumerate(track(reversed(range(M)), f"sampling (dpm_solver, {grid})", total=M)):
        t = full_steps(k, x)
        out = guided_model_output(model_fn, d, x, t, y, guidance_scale, null_class)
        x0 = d.p_mean_variance(out, x, t, clip_denoised=False, denoised_fn=process_x0).pred_x0  # x_theta
        if callback is not None:
            callback(i, int(d.timestep_map[k]), x, x0)
        if k == 0:
            # Final step to sigma = 0 (lambda = +inf), first order: sigma ratio 0, -alpha (e^{-h} - 1) = 1.
            x = x0
            continue  # k = 0 is the last kept step: the loop ends here
        s, n = k, k - 1  # from step s to step n (next kept step, less noise)
        h = float(lam[n] - lam[s])  # h_i > 0; +inf when leaving a zero-terminal-SNR start
        ratio = float(sigma[n] / sigma[s])  # sigma_{t_i} / sigma_{t_{i-1}}
        phi = -float(alpha[n]) * math.expm1(-h)  # -alpha_{t_i} (e^{-h_i} - 1)
        if order == 1 or x0_prev is None:
            D = x0  # first step: DPM-Solver++1
        else:
            r = h_prev / h  # r_i = h_{i-1} / h_i
            D = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        x = ratio * x + phi * D  # x_{t_i} = (sigma_i / sigma_{i-1}) x - alpha_i (e^{-h_i} - 1) D_i
        x0_prev, h_prev = x0, h
    return x
