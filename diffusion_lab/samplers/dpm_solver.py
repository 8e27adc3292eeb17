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

The network is evaluated at M discrete steps t_0 = T-1 > ... > t_{M-1} of the schedule (``select_timesteps``:
uniform in lambda, or diffusers' uniform-in-time grid), the first step is first order (no history yet),
and the last step goes to clean data, t_M with sigma = 0 (lambda = +inf). That last step is first order
(diffusers' ``lower_order_final`` with ``final_sigmas_type="zero"``): with sigma_{t_M} = 0 and
e^{-h} = 0 it returns x_theta(t_{M-1}) exactly. NFE = M.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_lab.diffusion import GaussianDiffusion, ModelFn, space_timesteps
from diffusion_lab.samplers.common import (
    Callback,
    check_x_T,
    full_steps,
    guided_model_output,
    make_x0_processor,
)

__all__ = ["dpm_solver_sample", "select_timesteps", "SKIP_TYPES"]

SKIP_TYPES = ("time_uniform", "logSNR")


def select_timesteps(
    diffusion: GaussianDiffusion, steps: int | str | None, skip_type: str = "logSNR"
) -> list[int]:
    """The discrete steps the network is evaluated at, ascending, as a list of distinct ints.

    Args:
        steps: None (all T), an int n, or ``"ddimN"`` / a section list (then ``space_timesteps`` decides).
        skip_type:
            ``logSNR``: the n steps nearest to n values of lambda evenly spaced between lambda_{T-1} and
            lambda_0 (DPM-Solver, Lu et al. 2022a, Sec. 3.3: best for low-resolution images); includes 0
            and T-1.
            ``time_uniform``: diffusers' "linspace" spacing, round(linspace(0, T-1, n+1))[1:], i.e. T-1
            down to about T/n, leaving step 0 out; the final jump to clean data starts from there.
            (Keeping step 0 instead makes the last 2M step extrapolate with h_{i-1}/h_i << 1 on a linear
            schedule and overshoot.)
    """
    T = diffusion.num_timesteps
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"unknown skip_type '{skip_type}'; valid: {', '.join(SKIP_TYPES)}")
    if steps is None:
        return list(range(T))
    if isinstance(steps, str) and steps.isdigit():
        steps = int(steps)
    if not isinstance(steps, int):
        return space_timesteps(T, steps)
    if not 1 <= steps <= T:
        raise ValueError(
            f"steps must lie in [1, {T}] (the diffusion's T) or be None for all steps, got {steps}"
        )
    if steps == T:
        return list(range(T))
    if skip_type == "time_uniform":
        # points at least (T-1)/n > 1 apart round to distinct integers
        grid = torch.linspace(0, T - 1, steps + 1, dtype=torch.float64).round().long()[1:]
        return grid.tolist()
    if steps == 1:
        return [T - 1]
    # uniform in lambda: for each target, the nearest step, then pushed apart to keep n distinct steps
    lam = _half_log_snr(diffusion.schedule.alphas_cumprod)  # (T,) decreasing in t
    finite = lam.clamp(min=lam[torch.isfinite(lam)].min())  # a zero-terminal-SNR end counts as its neighbour
    targets = torch.linspace(float(finite[0]), float(finite[-1]), steps, dtype=torch.float64)
    idx = (finite[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()  # ascending in t
    idx[0], idx[-1] = 0, T - 1
    for j in range(1, steps):  # strictly increasing, bottom up
        idx[j] = max(idx[j], idx[j - 1] + 1)
    idx[-1] = T - 1
    for j in range(steps - 2, -1, -1):  # and within [0, T-1], top down
        idx[j] = min(idx[j], idx[j + 1] - 1)
    return idx


def _half_log_snr(alphas_cumprod: Tensor) -> Tensor:
    """lambda_t = log(alpha_t / sigma_t) = 0.5 (log alpha_bar_t - log(1 - alpha_bar_t)), float64."""
    ab = alphas_cumprod.to(torch.float64)
    return 0.5 * (torch.log(ab) - torch.log1p(-ab))


@torch.no_grad()
def dpm_solver_sample(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    steps: int | str | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    y: Tensor | None = None,
    guidance_scale: float = 1.0,
    clip_denoised: bool = True,
    dynamic_threshold: float | None = None,
    null_class: int | None = None,
    order: int = 2,
    skip_type: str = "logSNR",
) -> Tensor:
    """Draw x_0 with DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2); ``steps`` network evaluations.

    Args:
        model_fn, diffusion, x_T, callback, y, guidance_scale, clip_denoised, dynamic_threshold,
        null_class: as for every sampler (see ``diffusion_lab.samplers.common``).
        steps: the number of network evaluations M (None = all T steps); also ``"ddimN"``.
        generator: unused (the solver is deterministic); accepted for the shared signature.
        order: 2 = DPM-Solver++(2M); 1 = DPM-Solver++1 (identical to DDIM with eta = 0).
        skip_type: ``time_uniform`` or ``logSNR`` step selection (see ``select_timesteps``).
    Returns:
        (B, C, H, W) samples.
    """
    del generator  # deterministic
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2 (DPM-Solver++ 1 or 2M), got {order}")
    check_x_T(x_T, diffusion)
    keep = select_timesteps(diffusion, steps, skip_type)
    d = diffusion if len(keep) == diffusion.num_timesteps else diffusion.respace(keep)
    process_x0 = make_x0_processor(clip_denoised, dynamic_threshold)

    # float64 tables over the kept steps k = 0..M-1; the network runs at k = M-1, ..., 0, then to clean data.
    ab = d.schedule.alphas_cumprod.to(torch.float64)
    alpha, sigma, lam = ab.sqrt(), (1.0 - ab).sqrt(), _half_log_snr(ab)

    x = x_T
    x0_prev, h_prev = None, None
    M = d.num_timesteps
    for i, k in enumerate(reversed(range(M))):
        t = full_steps(k, x)
        out = guided_model_output(model_fn, d, x, t, y, guidance_scale, null_class)
        x0 = d.p_mean_variance(out, x, t, clip_denoised=False, denoised_fn=process_x0).pred_x0  # x_theta
        if callback is not None:
            callback(i, int(d.timestep_map[k]), x, x0)
        if k == 0:
            # Final step to sigma = 0 (lambda = +inf), first order: sigma ratio 0, -alpha (e^{-h} - 1) = 1.
            return x0
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
    raise RuntimeError("unreachable: the loop returns at step 0")
