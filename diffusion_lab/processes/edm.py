"""The continuous-time family: EDM training (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models").

Notation (EDM, Table 1):

    code name     symbol           meaning
    ------------  ---------------  ----------------------------------------------------------------
    x             x = x_0 + sigma n   the noisy data in variance-exploding coordinates, n ~ N(0, I)
    sigma         sigma            the noise level (continuous, in [sigma_min, sigma_max])
    D             D_theta(x; sigma)   the denoiser, c_skip x + c_out F(c_in x; c_noise)  (EDM Eq. 7)
    F             F_theta          the network (any backbone of ``diffusion_lab.models``)
    P_mean/P_std  P_mean, P_std    ln(sigma) ~ N(P_mean, P_std^2) during training
    lambda        lambda(sigma)    the loss weight, 1 / c_out^2

The preconditioning itself is :class:`~diffusion_lab.processes.parameterization.EDMPreconditioning`. Training
(EDM Eq. 2 with Table 1's p_train and lambda):

    sigma ~ exp(N(P_mean, P_std^2)),  n ~ N(0, I),  loss = lambda(sigma) ||D(x_0 + sigma n; sigma) - x_0||^2

A discrete view, for the discrete samplers: every sigma is also a variance-preserving step with
alpha_bar = 1 / (1 + sigma^2) and x_t = x / sqrt(1 + sigma^2) (EDM Sec. 2 and App. C.1: VP and VE are the
same ODE up to this scaling). :class:`EDMDiffusion` is therefore also a
:class:`~diffusion_lab.processes.diffusion.GaussianDiffusion`
over ``discrete_steps`` Karras sigmas (EDM Eq. 5), on
which DDIM, DPM-Solver++ and ancestral sampling with a fixed variance run unchanged. Euler and Heun
(``diffusion_lab.samplers.edm``) evaluate D at any continuous sigma.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from diffusion_lab.processes.diffusion import GaussianDiffusion, ModelFn
from diffusion_lab.processes.likelihood import mean_flat
from diffusion_lab.processes.parameterization import EDMPreconditioning
from diffusion_lab.processes.paths import GaussianPath, VEPath, karras_sigmas
from diffusion_lab.processes.schedules import Schedule, betas_from_alphas_cumprod

__all__ = ["EDMDiffusion"]


class EDMDiffusion(GaussianDiffusion):
    """EDM's training objective and denoiser, with a discrete view for the discrete samplers.

    Args:
        schedule: accepted for the builder's contract (``objective(schedule=...)``) and not used: the noise
            levels are continuous, and the discrete view has its own grid (``discrete_steps``).
        sigma_data: the data's standard deviation (0.5 for images in [-1, 1], EDM Table 1).
        P_mean, P_std: the training noise distribution, ln(sigma) ~ N(P_mean, P_std^2) (-1.2, 1.2).
        sigma_min, sigma_max: the range of noise levels the samplers cover (0.002, 80).
        rho: the Karras grid's exponent (7), for the discrete view (the samplers take their own).
        discrete_steps: the number of noise levels of the discrete view (its T).
        sigmas: the discrete view's noise levels, ascending (T,); default ``discrete_steps`` Karras sigmas.
        timestep_map: for a respaced view, the index of each of its steps in the original grid.
    """

    has_likelihood = False  # no bits/dim: the variational bound belongs to the discrete family

    def __init__(
        self,
        schedule: Schedule | None = None,
        sigma_data: float = 0.5,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        discrete_steps: int = 1000,
        sigmas: Tensor | None = None,
        timestep_map: Tensor | None = None,
    ):
        del schedule  # continuous noise levels; see the docstring
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max (0.002 and 80 in EDM), got {sigma_min}, {sigma_max}"
            )
        if not P_std > 0:
            raise ValueError(f"P_std must be > 0 (1.2 in EDM), got {P_std}")
        if sigmas is None:
            if int(discrete_steps) < 2:
                raise ValueError(f"discrete_steps must be >= 2 (1000 by default), got {discrete_steps}")
            sigmas = karras_sigmas(int(discrete_steps), sigma_min, sigma_max, rho).flip(0)  # ascending
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        ab = 1.0 / (1.0 + sigmas**2)  # alpha_bar of the VP step with the same noise-to-signal ratio
        view = Schedule(name=f"edm[{sigmas.numel()} sigmas]", betas=betas_from_alphas_cumprod(ab))
        super().__init__(view, parameterization=EDMPreconditioning(sigma_data), timestep_map=timestep_map)
        self.precond: EDMPreconditioning = self.parameterization
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.register_buffer("sigmas", sigmas.to(torch.float32), persistent=False)

    @property
    def sigma_data(self) -> float:
        return self.precond.sigma_data

    # ---------------------------------------------------------------------------------- the denoiser

    def network_output(self, model_fn: ModelFn, x: Tensor, sigma: Tensor, y: Tensor | None = None) -> Tensor:
        """F(c_in x; c_noise), (B, C, H, W), for x (B, C, H, W) at noise levels sigma (B,)."""
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        return model_fn(self.precond.c_in(s) * x, self.precond.c_noise(sigma.to(x.dtype)), y)

    def denoise(self, model_fn: ModelFn, x: Tensor, sigma: Tensor, y: Tensor | None = None) -> Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)   (EDM Eq. 7). x (B, C, H, W), sigma (B,)."""
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        out = self.network_output(model_fn, x, sigma, y)
        pred, _ = self.split_output(out, x)
        return self.precond.denoise(pred, x, s)

    # ------------------------------------------------------------------------- the continuous view

    def path(self) -> GaussianPath:
        """EDM's VE path: alpha = 1, sigma from sigma_min (t = 0) to sigma_max (t = 1), geometric in t."""
        return VEPath(self.sigma_min, self.sigma_max)

    def predict(
        self, model_fn: ModelFn, x: Tensor, t: Tensor, y: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(D(x; sigma(t)), (x - D) / sigma(t)) at continuous t (B,) of ``path()``: no rounding."""
        sigma = self.path().sigma(t.to(torch.float64)).to(device=x.device, dtype=x.dtype)
        D = self.denoise(model_fn, x, sigma, y)
        return D, (x - D) / sigma.reshape(-1, *([1] * (x.ndim - 1)))

    # ------------------------------------------------------------------------------------- training

    def sample_timesteps(self, batch: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """sigma ~ exp(N(P_mean, P_std^2)), shape (batch,), float32   (EDM Table 1, p_train)."""
        n = torch.randn((batch,), device=device, generator=generator)
        return (self.P_mean + self.P_std * n).exp()

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        t: Tensor | None = None,
        eps: Tensor | None = None,
        y: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-example losses, each (B,): ``loss`` = lambda(sigma) ||D(x_0 + sigma n; sigma) - x_0||^2
        (EDM Eq. 2 with Table 1's lambda) and ``mse`` = ||D - x_0||^2 before weighting (means over pixels).

        Args:
            x0: (B, C, H, W) data; t: (B,) noise levels sigma (default: drawn by ``sample_timesteps``);
            eps: (B, C, H, W) the noise n ~ N(0, I); y: (B,) labels or None.
        """
        B = x0.shape[0]
        sigma = self.sample_timesteps(B, device=x0.device) if t is None else t
        if not sigma.is_floating_point():
            raise ValueError(
                "EDMDiffusion.training_losses: t holds the noise levels sigma (float), not steps"
            )
        if eps is None:
            eps = torch.randn_like(x0)
        s = sigma.to(x0.dtype).reshape(B, *([1] * (x0.ndim - 1)))  # (B, 1, 1, 1)
        D = self.denoise(model_fn, x0 + s * eps, sigma, y)
        mse = mean_flat((D.float() - x0.float()) ** 2)
        return {"loss": self.precond.loss_weight(sigma.float()) * mse, "mse": mse}

    # -------------------------------------------------------------------------------- discrete view

    def run_model(self, model_fn: ModelFn, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The network at step t of the discrete view: x = x_t sqrt(1 + sigma_t^2), then F(c_in x; c_noise).

        ``parameterization.to_x0_eps`` turns the output into (D, eps) with the same tables.
        """
        sigma = self.sigmas.to(x_t.device)[t.to(x_t.device)]  # (B,)
        scale = (1.0 + sigma.to(x_t.dtype) ** 2).sqrt().reshape(-1, *([1] * (x_t.ndim - 1)))
        return self.network_output(model_fn, x_t * scale, sigma, y)

    def respace(self, use_timesteps: Iterable[int]) -> EDMDiffusion:
        """The discrete view over a subset of its noise levels (every sampler's ``grid`` ends here)."""
        keep = sorted(set(int(k) for k in use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"respace: steps must lie in [0, {self.num_timesteps - 1}], got {keep[:3]}...")
        idx = torch.tensor(keep)
        return EDMDiffusion(
            sigma_data=self.sigma_data,
            P_mean=self.P_mean,
            P_std=self.P_std,
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
            rho=self.rho,
            sigmas=self.schedule_sigmas()[idx],
            timestep_map=self.timestep_map.cpu()[idx],
        ).to(self.betas.device)

    def schedule_sigmas(self) -> Tensor:
        """The discrete view's noise levels in float64, ascending (T,)."""
        ab = self.schedule.alphas_cumprod.to(torch.float64)
        return ((1.0 - ab) / ab).sqrt()

    # --------------------------------------------------------------------------------- likelihood

    def _no_bpd(self, *args, **kwargs):
        raise ValueError(
            "bits/dim is not defined for objective=edm (the variational bound belongs to the discrete "
            "family); evaluate sample metrics instead (e.g. fid_classifier) or train objective=hybrid"
        )

    bpd_bound = _no_bpd
    bpd_estimate = _no_bpd
    vlb_terms = _no_bpd

    def extra_repr(self) -> str:
        return (
            f"sigma_data={self.sigma_data}, P_mean={self.P_mean}, P_std={self.P_std}, "
            f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, discrete view T={self.num_timesteps}"
        )
