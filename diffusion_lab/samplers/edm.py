"""Euler and Heun samplers in sigma space (Karras et al. 2022, "EDM", Algorithms 1 and 2), for every model.

They integrate the probability-flow ODE of EDM Eq. 4 with sigma(t) = t, s(t) = 1,

    dx / dsigma = (x - D(x; sigma)) / sigma,

from x ~ N(0, sigma_0^2 I) down a grid sigma_0 > ... > sigma_{N-1} > sigma_N = 0. Heun (Algorithm 2):

    gamma_i  = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax else 0
    s_hat    = sigma_i (1 + gamma_i);   x_hat = x_i + sqrt(s_hat^2 - sigma_i^2) S_noise z      (churn)
    d_i      = (x_hat - D(x_hat; s_hat)) / s_hat
    x_{i+1}  = x_hat + (sigma_{i+1} - s_hat) d_i                                             (Euler step)
    if sigma_{i+1} != 0:   d'_i = (x_{i+1} - D(x_{i+1}; sigma_{i+1})) / sigma_{i+1}
                           x_{i+1} = x_hat + (sigma_{i+1} - s_hat) (d_i + d'_i) / 2              (correction)

S_churn = 0 is the deterministic Algorithm 1 (2N - 1 network evaluations); Euler drops the correction
(N evaluations) and keeps the churn option. The last step to sigma = 0 returns D(x; sigma_{N-1}).

The denoiser D comes from the diffusion:

* :class:`~diffusion_lab.processes.edm.EDMDiffusion`:
  its preconditioned network at any sigma (EDM Eq. 7); the grid
  ``karras`` is EDM Eq. 5 exactly (``grid_opts``: sigma_min, sigma_max, rho), any other grid picks sigmas of
  the diffusion's discrete view.
* any discrete :class:`~diffusion_lab.processes.diffusion.GaussianDiffusion`
  (eps / x0 / v, any schedule): step t has
  sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t); the network sees x_t = x / sqrt(1 + sigma_t^2) at t and
  D is its x_0 prediction. Sigmas are rounded to the nearest sigma_t in log sigma (EDM's ``round_sigma`` for
  discrete models, App. C.3.2), so the grid (any of ``timesteps.GRIDS``) and the churned s_hat are steps of
  the model and the network always sees an integer training step.

``callback(i, t, x_t, pred_x0)`` is called once per step i (not for the correction's evaluation), with the
training step t nearest to s_hat, x_t = x_hat / sqrt(1 + s_hat^2) (the variance-preserving state, as the
discrete samplers report) and pred_x0 = D(x_hat; s_hat).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from diffusion_lab.processes.diffusion import GaussianDiffusion, ModelFn
from diffusion_lab.processes.edm import EDMDiffusion
from diffusion_lab.processes.flow import FlowMatching
from diffusion_lab.samplers.common import (
    Callback,
    _null_labels,
    check_x_T,
    full_steps,
    guided_model_output,
    make_x0_processor,
    randn_like,
)
from diffusion_lab.samplers.timesteps import karras_sigmas, make_grid
from diffusion_lab.samplers.timesteps import sigmas as discrete_sigmas
from diffusion_lab.utils.progress import track

__all__ = ["euler_sample", "heun_sample", "churn_gamma", "sigma_denoiser", "SigmaDenoiser"]

X0Processor = Callable[[Tensor], Tensor] | None
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0  # EDM's sampling range (Table 1 / generate.py)


def churn_gamma(sigma: float, n: int, S_churn: float, S_tmin: float, S_tmax: float) -> float:
    """gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax, else 0  (EDM Algorithm 2)."""
    if S_churn > 0 and S_tmin <= sigma <= S_tmax:
        return min(S_churn / n, math.sqrt(2.0) - 1.0)
    return 0.0


# ------------------------------------------------------------------------------------------ denoisers


class SigmaDenoiser:
    """D(x; sigma) of a trained model, with the sigma grid and rounding of its diffusion.

    Args:
        model_fn, diffusion: the network and its diffusion.
        y, guidance_scale, null_class: labels and classifier-free guidance, as for every sampler.
        process_x0: the map applied to every D (clipping / dynamic thresholding) or None.
    """

    def __init__(
        self,
        model_fn: ModelFn,
        diffusion: GaussianDiffusion,
        y: Tensor | None,
        guidance_scale: float,
        null_class: int | None,
        process_x0: X0Processor,
    ):
        self.model_fn, self.diffusion = model_fn, diffusion
        self.y, self.guidance_scale, self.null_class = y, guidance_scale, null_class
        self.process_x0 = process_x0
        # (T,) float64, ascending: the noise level of each step of the discrete (view of the) diffusion
        self.table = self._table()
        self.log_table = self.table.log()

    def _table(self) -> Tensor:
        return discrete_sigmas(self.diffusion)

    def grid(self, steps: int | str | None, grid: str, grid_opts: Mapping[str, Any]) -> list[float]:
        """The sampler's sigmas sigma_0 > ... > sigma_{N-1} (without the final 0).

        The karras grid defaults to EDM's sampler range, [max(0.002, sigma_min), min(80, sigma_max)] of the
        model (EDM's ``generate.py``): the model's own sigma_max can be 10^4 (cosine) or infinite (zero
        terminal SNR), where rho = 7 would spend most steps at noise levels that change nothing.
        """
        opts = dict(grid_opts)
        if grid == "karras":
            opts.setdefault("sigma_min", max(SIGMA_MIN, float(self.table[0])))
            opts.setdefault("sigma_max", min(SIGMA_MAX, float(self.table[-1])))
        idx = make_grid(grid, self.diffusion, steps, **opts)
        return self.table[idx].tolist()

    def nearest_step(self, sigma: float) -> int:
        """The step whose sigma_t is nearest to sigma in log sigma."""
        return int((self.log_table - math.log(sigma)).abs().argmin())

    def round_sigma(self, sigma: float) -> float:
        return float(self.table[self.nearest_step(sigma)])

    def training_step(self, sigma: float) -> int:
        """The original training step nearest to sigma (the callback's t)."""
        return int(self.diffusion.timestep_map[self.nearest_step(sigma)])

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        raise NotImplementedError


def _finite_table(diffusion: GaussianDiffusion) -> Tensor:
    """sigma_t of every step; at zero terminal SNR (alpha_bar_T = 0, sigma = inf) the last step gets the
    sigma one log-step beyond its neighbour, so that x / sqrt(1 + sigma^2) ~ N(0, I) is what is seen there."""
    table = discrete_sigmas(diffusion)
    if not torch.isfinite(table[-1]):
        log_step = table[-2].log() - table[-3].log() if table.numel() > 2 else torch.tensor(1.0)
        table = torch.cat([table[:-1], (table[-2].log() + log_step).exp()[None]])
    return table


class DiscreteDenoiser(SigmaDenoiser):
    """D(x; sigma_t) of a discrete model: its x_0 prediction at step t from x_t = x / sqrt(1 + sigma_t^2)."""

    def _table(self) -> Tensor:
        return _finite_table(self.diffusion)

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        d, k = self.diffusion, self.nearest_step(sigma)
        t = full_steps(k, x)
        x_t = x / math.sqrt(1.0 + float(self.table[k]) ** 2)
        out = guided_model_output(self.model_fn, d, x_t, t, self.y, self.guidance_scale, self.null_class)
        return d.p_mean_variance(out, x_t, t, clip_denoised=False, denoised_fn=self.process_x0).pred_x0


class ContinuousDenoiser(SigmaDenoiser):
    """D(x; sigma) = ``diffusion.denoise(model_fn, x, sigma, y)`` at any sigma (k-diffusion's contract), with
    classifier-free guidance on D."""

    def round_sigma(self, sigma: float) -> float:
        return sigma  # continuous noise levels

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        d, y, s = self.diffusion, self.y, torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype)
        if y is None or self.guidance_scale == 1.0:
            D = d.denoise(self.model_fn, x, s, y)
        else:  # Ho & Salimans 2022, Eq. 6 on D (affine in F with weights summing to one)
            y_null = _null_labels(y, self.null_class, self.model_fn)
            if y_null is not None:
                D_cond, D_uncond = d.denoise(
                    self.model_fn, torch.cat([x, x]), torch.cat([s, s]), torch.cat([y, y_null])
                ).chunk(2)
            else:
                D_cond, D_uncond = d.denoise(self.model_fn, x, s, y), d.denoise(self.model_fn, x, s, None)
            D = D_uncond + self.guidance_scale * (D_cond - D_uncond)
        return D if self.process_x0 is None else self.process_x0(D)


class FlowDenoiser(ContinuousDenoiser):
    """D(x; sigma) of a flow-matching / interpolant model in the VE view x = x_t / alpha,
    sigma = sigma / alpha of its path (``FlowMatching.denoise``); grids other than karras pick the
    discrete view's sigmas."""

    def _table(self) -> Tensor:
        return _finite_table(self.diffusion)


class EDMDenoiser(ContinuousDenoiser):
    """D(x; sigma) of an EDM model at any sigma (EDM Eq. 7), with guidance on D."""

    diffusion: EDMDiffusion

    def _table(self) -> Tensor:
        return self.diffusion.schedule_sigmas()

    def grid(self, steps: int | str | None, grid: str, grid_opts: Mapping[str, Any]) -> list[float]:
        if grid != "karras":
            return super().grid(steps, grid, grid_opts)
        d, opts = self.diffusion, dict(grid_opts)
        unknown = set(opts) - {"sigma_min", "sigma_max", "rho"}
        if unknown:
            raise ValueError(
                f"grid karras: unknown options {sorted(unknown)}; valid: sigma_min, sigma_max, rho"
            )
        n = d.num_timesteps if steps is None else int(steps)
        lo, hi = opts.get("sigma_min") or d.sigma_min, opts.get("sigma_max") or d.sigma_max
        return karras_sigmas(n, float(lo), float(hi), float(opts.get("rho") or d.rho)).tolist()


def sigma_denoiser(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    y: Tensor | None = None,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
    process_x0: X0Processor = None,
) -> SigmaDenoiser:
    """The sigma-space denoiser of any trained diffusion (continuous for EDM and flows, rounded for discrete
    ones)."""
    if isinstance(diffusion, EDMDiffusion):
        cls = EDMDenoiser
    elif isinstance(diffusion, FlowMatching):
        cls = FlowDenoiser
    else:
        cls = DiscreteDenoiser
    return cls(model_fn, diffusion, y, guidance_scale, null_class, process_x0)


# ---------------------------------------------------------------------------------------- the samplers


@torch.no_grad()
def _edm_sample(
    order: int,
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    steps: int | str | None,
    grid: str,
    grid_opts: Mapping[str, Any] | None,
    generator: torch.Generator | None,
    callback: Callback | None,
    y: Tensor | None,
    guidance_scale: float,
    clip_denoised: bool,
    dynamic_threshold: float | None,
    null_class: int | None,
    S_churn: float,
    S_tmin: float,
    S_tmax: float | None,
    S_noise: float,
) -> Tensor:
    """EDM Algorithm 2 (order 2) or its first-order variant (order 1); see the module docstring."""
    S_tmax = math.inf if S_tmax is None else float(S_tmax)
    if S_churn < 0 or S_noise <= 0 or S_tmin > S_tmax:
        raise ValueError(
            f"churn options: need S_churn >= 0, S_noise > 0 and S_tmin <= S_tmax, got S_churn={S_churn}, "
            f"S_noise={S_noise}, S_tmin={S_tmin}, S_tmax={S_tmax} (S_churn=0 is deterministic)"
        )
    check_x_T(x_T, diffusion)
    D = sigma_denoiser(
        model_fn,
        diffusion,
        y,
        guidance_scale,
        null_class,
        make_x0_processor(clip_denoised, dynamic_threshold),
    )
    sigmas = [D.round_sigma(s) for s in D.grid(steps, grid, dict(grid_opts or {}))] + [0.0]
    N = len(sigmas) - 1
    x = x_T * sigmas[0]  # x_0 ~ N(0, sigma_0^2 I)
    name = "heun" if order == 2 else "euler"
    for i in track(range(N), f"sampling ({name}, {grid})", total=N):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        gamma = churn_gamma(s_cur, N, S_churn, S_tmin, S_tmax)
        s_hat = D.round_sigma(s_cur * (1.0 + gamma))
        x_hat = x
        if s_hat > s_cur:  # add noise to raise the level from s_cur to s_hat
            x_hat = x + math.sqrt(s_hat**2 - s_cur**2) * S_noise * randn_like(x, generator)
        denoised = D(x_hat, s_hat)
        if callback is not None:
            callback(i, D.training_step(s_hat), x_hat / math.sqrt(1.0 + s_hat**2), denoised)
        d_cur = (x_hat - denoised) / s_hat
        x = x_hat + (s_next - s_hat) * d_cur  # Euler step
        if order == 2 and s_next > 0:  # Heun's correction (2nd order)
            d_next = (x - D(x, s_next)) / s_next
            x = x_hat + (s_next - s_hat) * (0.5 * d_cur + 0.5 * d_next)
    return x


def euler_sample(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    steps: int | str | None = None,
    *,
    grid: str = "karras",
    grid_opts: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    y: Tensor | None = None,
    guidance_scale: float = 1.0,
    clip_denoised: bool = True,
    dynamic_threshold: float | None = None,
    null_class: int | None = None,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float | None = None,
    S_noise: float = 1.0,
) -> Tensor:
    """Draw x_0 with Euler steps of the probability-flow ODE in sigma (EDM Algorithm 2 without the
    correction); ``steps`` = N network evaluations.

    Args:
        model_fn, diffusion, x_T, generator, callback, y, guidance_scale, clip_denoised, dynamic_threshold,
        null_class: as for every sampler (see ``diffusion_lab.samplers.common``).
        steps: N, the number of noise levels before the final 0 (None = all T of the diffusion).
        grid: ``karras`` (EDM Eq. 5, the default) or any grid of ``timesteps.GRIDS``; grid_opts: its options.
        S_churn, S_tmin, S_tmax, S_noise: the stochastic churn of EDM Algorithm 2 (S_churn = 0: an ODE
            solver); S_tmax None = no upper limit.
    Returns:
        (B, C, H, W) samples.
    """
    return _edm_sample(
        1,
        model_fn,
        diffusion,
        x_T,
        steps,
        grid,
        grid_opts,
        generator,
        callback,
        y,
        guidance_scale,
        clip_denoised,
        dynamic_threshold,
        null_class,
        S_churn,
        S_tmin,
        S_tmax,
        S_noise,
    )


def heun_sample(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    steps: int | str | None = None,
    *,
    grid: str = "karras",
    grid_opts: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    y: Tensor | None = None,
    guidance_scale: float = 1.0,
    clip_denoised: bool = True,
    dynamic_threshold: float | None = None,
    null_class: int | None = None,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float | None = None,
    S_noise: float = 1.0,
) -> Tensor:
    """Draw x_0 with Heun's 2nd-order method (EDM Algorithm 2; Algorithm 1 with S_churn = 0);
    2 ``steps`` - 1 network evaluations (18 steps = 35 NFE, EDM's CIFAR-10 setting).

    Args: as for :func:`euler_sample`.
    Returns:
        (B, C, H, W) samples.
    """
    return _edm_sample(
        2,
        model_fn,
        diffusion,
        x_T,
        steps,
        grid,
        grid_opts,
        generator,
        callback,
        y,
        guidance_scale,
        clip_denoised,
        dynamic_threshold,
        null_class,
        S_churn,
        S_tmin,
        S_tmax,
        S_noise,
    )
