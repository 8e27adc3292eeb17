"""Euler-Maruyama on the reverse-time SDE of a Gaussian path (SiT's ``sample_sde``, Ma et al. 2024, Sec. 2.3;
Albergo & Vanden-Eijnden 2023, Sec. 2.4), for every family through ``diffusion.path()`` and
``diffusion.predict(model_fn, x, t, y)`` -> (x0_hat, eps_hat) at continuous t.

For any w(t) >= 0 the SDE dx = [u(x, t) + w(t) s(x, t)] dt + sqrt(2 w(t)) dW has the marginals of the path
(u = d_alpha x0_hat + d_sigma eps_hat the velocity, s = -eps_hat / sigma the score). Run backwards from
t_start to t_end (data at t = 0, noise at t = 1), with step h = t_i - t_{i+1} > 0:

    x_{i+1} = x_i - h (u(x_i, t_i) - w(t_i) s(x_i, t_i)) + sqrt(2 w(t_i) h) z,   z ~ N(0, I)

and the last evaluation returns the denoised x0_hat(x, t_end) (SiT's ``last_step``: Tweedie's mean). NFE =
steps. The start is x = sigma(t_start) x_T, exact where alpha(t_start) = 0 (linear, GVP at t = 1).

w(t) (``diffusion_form`` times ``diffusion_norm``; SiT's choices with t -> 1 - t):

    constant   1
    sigma      sigma(t)                              (SiT's default)
    linear     t
    sbdm       sigma d_sigma - sigma^2 d_alpha / alpha: half the g^2 of the score-based diffusion SDE
               (Song et al. 2021); then the drift is the reverse VP/VE SDE's. Infinite where alpha = 0:
               start below t = 1 (``t_start``) on the linear and GVP paths.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_lab.processes.diffusion import GaussianDiffusion, ModelFn
from diffusion_lab.processes.likelihood_ode import ode_interval
from diffusion_lab.processes.paths import Coefs
from diffusion_lab.samplers.common import Callback, _null_labels, check_x_T, make_x0_processor, randn_like
from diffusion_lab.utils.progress import track

__all__ = ["euler_maruyama_sample", "DIFFUSION_FORMS", "diffusion_coefficient"]

DIFFUSION_FORMS = ("constant", "sigma", "linear", "sbdm")


def diffusion_coefficient(form: str, c: Coefs, t: Tensor, norm: float = 1.0) -> Tensor:
    """w(t) of the SDE (see the module docstring), broadcast like c.alpha."""
    if form == "constant":
        w = torch.ones_like(c.alpha)
    elif form == "sigma":
        w = c.sigma
    elif form == "linear":
        w = t.reshape(c.alpha.shape).to(c.alpha.dtype)
    elif form == "sbdm":
        d_alpha, d_sigma = c.derivatives()
        w = c.sigma * d_sigma - c.sigma**2 * d_alpha / c.alpha
    else:
        raise ValueError(f"unknown diffusion_form '{form}'; valid: {', '.join(DIFFUSION_FORMS)}")
    return norm * w


def _guided_predict(model_fn, d, x, t, y, guidance_scale, null_class) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat), classifier-free guided (Ho & Salimans 2022, Eq. 6; both affine in the output)."""
    if y is None or guidance_scale == 1.0:
        return d.predict(model_fn, x, t, y)
    y_null = _null_labels(y, null_class, model_fn)
    if y_null is not None:
        x0, eps = d.predict(model_fn, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
        (x0_c, x0_u), (eps_c, eps_u) = x0.chunk(2), eps.chunk(2)
    else:
        x0_c, eps_c = d.predict(model_fn, x, t, y)
        x0_u, eps_u = d.predict(model_fn, x, t, None)
    return x0_u + guidance_scale * (x0_c - x0_u), eps_u + guidance_scale * (eps_c - eps_u)


@torch.no_grad()
def euler_maruyama_sample(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    steps: int | None = 100,
    *,
    grid: str = "time_uniform",
    grid_opts=None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    y: Tensor | None = None,
    guidance_scale: float = 1.0,
    clip_denoised: bool = True,
    dynamic_threshold: float | None = None,
    null_class: int | None = None,
    diffusion_form: str = "sigma",
    diffusion_norm: float = 1.0,
    t_start: float | None = None,
    t_end: float = 0.001,
) -> Tensor:
    """Draw x_0 with Euler-Maruyama steps of the path's reverse SDE (SiT's ``sample_sde``); NFE = ``steps``.

    Args:
        model_fn, diffusion, x_T, generator, callback, y, guidance_scale, clip_denoised, dynamic_threshold,
        null_class: as for every sampler (``samplers.common``); the callback's t is the nearest step of the
            diffusion's discrete view, and x_t the path state.
        steps: network evaluations (>= 2): steps - 1 SDE steps uniform in t, then the denoised mean.
        grid: only ``time_uniform`` (uniform in t, as SiT).
        diffusion_form, diffusion_norm: w(t) (``DIFFUSION_FORMS``) and its factor (0 = the ODE, Euler in t).
        t_start: the first time (default: the upper end of the objective's ODE interval, ``ode_interval``);
        t_end: the last (the lower end of that interval at least).
    Returns:
        (B, C, H, W) samples.
    """
    if grid != "time_uniform" or grid_opts:
        raise ValueError("euler_maruyama steps uniformly in t: use sampler.grid=time_uniform, no grid_opts")
    if steps is None or int(steps) < 2:
        raise ValueError(f"euler_maruyama needs steps >= 2 (SDE steps + the final denoising), got {steps}")
    if diffusion_norm < 0:
        raise ValueError(f"diffusion_norm must be >= 0 (0 = the probability-flow ODE), got {diffusion_norm}")
    check_x_T(x_T, diffusion)
    if not hasattr(diffusion, "predict"):
        raise ValueError(f"euler_maruyama needs a diffusion with a continuous view, got {type(diffusion)}")
    path = diffusion.path()
    lo, hi = ode_interval(diffusion)  # where the model's conversions are defined (SiT's check_interval)
    t0 = hi if t_start is None else float(t_start)
    t1 = max(float(t_end), lo)
    if not path.t_min <= t1 < t0 <= path.t_max:
        raise ValueError(
            f"euler_maruyama: need {path.t_min:g} <= t_end < t_start <= {path.t_max:g}, got {t1:g}, {t0:g}"
        )
    times = torch.linspace(t0, t1, int(steps), dtype=torch.float64)
    w0 = diffusion_coefficient(diffusion_form, path.coefs(times[:1], times[:1, None]), times[:1], 1.0)
    if not bool(torch.isfinite(w0).all()):
        raise ValueError(
            f"diffusion_form={diffusion_form} is infinite at t_start={t0:g} (alpha = 0): set sampler.t_start "
            "below it (e.g. 0.99) or use diffusion_form=sigma"
        )
    process_x0 = make_x0_processor(clip_denoised, dynamic_threshold)
    view = getattr(path, "nearest_step", None)
    B = x_T.shape[0]
    x = x_T * float(path.sigma(times[:1]))
    N = times.numel()
    for i in track(range(N), f"sampling (euler_maruyama, {diffusion_form})", total=N):
        t = times[i].expand(B).to(x.device)
        c = path.coefs(t, x)
        x0, eps = _guided_predict(model_fn, diffusion, x, t.to(x.dtype), y, guidance_scale, null_class)
        if process_x0 is not None:
            x0 = process_x0(x0)
            eps = (x - c.alpha * x0) / c.sigma
        if callback is not None:
            k = int(view(t[:1])[0]) if view else i
            callback(i, k, x, x0)
        if i == N - 1:
            return x0
        h = float(times[i] - times[i + 1])
        velocity = c.d_alpha * x0 + c.d_sigma * eps
        score = -eps / c.sigma
        w = diffusion_coefficient(diffusion_form, c, t, diffusion_norm)
        x = x - h * (velocity - w * score) + (2.0 * w * h).sqrt() * randn_like(x, generator)
    return x  # pragma: no cover  (the loop returns)
