"""What the network predicts: epsilon, x_0 or v.

Each parameterization is a small class with the same members, so a new one (e.g. EDM's F-prediction) is
one new class in this file and nothing else changes:

    target(x0, eps, t, d)          the regression target of the simple loss
    to_x0_eps(out, x_t, t, d)      (x0_hat, eps_hat) from the network output
    x0_error_scale(snr)            ||target error||^2 / ||x0 error||^2 at fixed x_t (for min-SNR weighting)
    supports_zero_terminal_snr     whether x0_hat stays defined at alpha_bar = 0

where ``d`` is the :class:`~diffusion_lab.processes.diffusion.GaussianDiffusion` that
holds the schedule tables.
With a = sqrt(alpha_bar_t) and s = sqrt(1 - alpha_bar_t), so that x_t = a x_0 + s eps:

    eps:  x0 = (x_t - s eps) / a                              (Ho et al. 2020, Eq. 11 and 15)
    x0:   eps = (x_t - a x0) / s
    v:    v = a eps - s x0;  x0 = a x_t - s v;  eps = s x_t + a v   (Salimans & Ho 2022, Sec. 4 and App. D)

At fixed x_t an error in the prediction maps linearly to an error in x0_hat, which gives x0_error_scale
(SNR = a^2 / s^2):

    eps:  d x0 = -(s / a) d eps   ->  ||d eps||^2 = SNR ||d x0||^2
    x0:                               ||d x0||^2  = 1 ||d x0||^2
    v:    d x0 = -s d v           ->  ||d v||^2   = (SNR + 1) ||d x0||^2      (1 / s^2 = SNR + 1)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from diffusion_lab.processes.diffusion import GaussianDiffusion

__all__ = [
    "Parameterization",
    "EpsPrediction",
    "X0Prediction",
    "VPrediction",
    "PARAMETERIZATIONS",
    "get_parameterization",
    "EDMPreconditioning",
]


class Parameterization:
    """Interface: a mapping between the network output and (x_0, eps).

    Attributes:
        name: the config name (``objective.parameterization``).
        supports_zero_terminal_snr: False where x0_hat divides by sqrt(alpha_bar_t), which is 0 at the last
            step of a zero-terminal-SNR schedule (Lin et al. 2024, Sec. 3.2).
    """

    name: str = ""
    supports_zero_terminal_snr: bool = True

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, d: GaussianDiffusion) -> Tensor:
        """The regression target of the simple loss, shaped like x0."""
        raise NotImplementedError

    def to_x0_eps(self, out: Tensor, x_t: Tensor, t: Tensor, d: GaussianDiffusion) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat), each shaped like x_t, from the network output ``out`` at (x_t, t)."""
        raise NotImplementedError

    def x0_error_scale(self, snr: Tensor) -> Tensor:
        """||target - pred||^2 / ||x0 - x0_hat||^2 at fixed x_t, per example: (B,) from SNR_t (B,).

        Min-SNR weighting (Hang et al. 2023) divides by it to put min(SNR, gamma) on the x_0 error.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EpsPrediction(Parameterization):
    name = "eps"
    supports_zero_terminal_snr = False  # x0 = (x_t - s eps) / a with a = 0

    def target(self, x0, eps, t, d):
        return eps

    def to_x0_eps(self, out, x_t, t, d):
        a, s = d.coef("sqrt_alphas_cumprod", t, x_t), d.coef("sqrt_one_minus_alphas_cumprod", t, x_t)
        return (x_t - s * out) / a, out

    def x0_error_scale(self, snr):
        return snr


class X0Prediction(Parameterization):
    name = "x0"

    def target(self, x0, eps, t, d):
        return x0

    def to_x0_eps(self, out, x_t, t, d):
        a, s = d.coef("sqrt_alphas_cumprod", t, x_t), d.coef("sqrt_one_minus_alphas_cumprod", t, x_t)
        return out, (x_t - a * out) / s

    def x0_error_scale(self, snr):
        return torch.ones_like(snr)


class VPrediction(Parameterization):
    name = "v"

    def target(self, x0, eps, t, d):
        a, s = d.coef("sqrt_alphas_cumprod", t, x0), d.coef("sqrt_one_minus_alphas_cumprod", t, x0)
        return a * eps - s * x0

    def to_x0_eps(self, out, x_t, t, d):
        a, s = d.coef("sqrt_alphas_cumprod", t, x_t), d.coef("sqrt_one_minus_alphas_cumprod", t, x_t)
        return a * x_t - s * out, s * x_t + a * out

    def x0_error_scale(self, snr):
        return snr + 1.0


PARAMETERIZATIONS: dict[str, type[Parameterization]] = {
    cls.name: cls for cls in (EpsPrediction, X0Prediction, VPrediction)
}


def get_parameterization(name: str | Parameterization) -> Parameterization:
    if isinstance(name, Parameterization):
        return name
    if name not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization '{name}'; valid names: {', '.join(PARAMETERIZATIONS)}")
    return PARAMETERIZATIONS[name]()


class EDMPreconditioning(Parameterization):
    """EDM's preconditioned denoiser (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
    Generative Models", Eq. 7 and Table 1): the network F_theta predicts a mix of x_0 and noise, scaled so
    that its input and its training target have unit variance at every noise level.

    In the variance-exploding coordinates x = x_0 + sigma n (n ~ N(0, I); x = x_t / sqrt(alpha_bar_t) and
    sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t) for a discrete schedule):

        D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))      (EDM Eq. 7)

        c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)                                  (Table 1)
        c_out   = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
        c_in    = 1 / sqrt(sigma^2 + sigma_data^2)
        c_noise = ln(sigma) / 4
        lambda  = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2     the loss weight, = 1 / c_out^2

    so lambda ||D - x_0||^2 = ||F - (x_0 - c_skip x) / c_out||^2 (EDM Eq. 8): the network regresses onto the
    effective target (x_0 - c_skip x) / c_out with unit weight. The network's own input (c_in x, c_noise) is
    formed by :class:`~diffusion_lab.processes.edm.EDMDiffusion`, which holds this class.

    Args:
        sigma_data: the standard deviation of the data (0.5 in the paper for images in [-1, 1]).
    """

    name = "edm"
    supports_zero_terminal_snr = False  # x = x_t / sqrt(alpha_bar_t) is undefined at alpha_bar = 0

    def __init__(self, sigma_data: float = 0.5):
        if not sigma_data > 0:
            raise ValueError(
                f"sigma_data must be > 0 (the data's standard deviation, 0.5 in EDM), got {sigma_data}"
            )
        self.sigma_data = float(sigma_data)

    # Table 1; sigma is a tensor broadcastable against the data, e.g. (B, 1, 1, 1).
    def c_skip(self, sigma: Tensor) -> Tensor:
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: Tensor) -> Tensor:
        return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()

    def c_in(self, sigma: Tensor) -> Tensor:
        return 1.0 / (sigma**2 + self.sigma_data**2).sqrt()

    def c_noise(self, sigma: Tensor) -> Tensor:
        return sigma.log() / 4.0

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2   (Table 1)."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def denoise(self, out: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        """D(x; sigma) = c_skip x + c_out F from the network output F   (EDM Eq. 7)."""
        return self.c_skip(sigma) * x + self.c_out(sigma) * out

    def network_target(self, x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
        """The effective training target of F: (x_0 - c_skip (x_0 + sigma eps)) / c_out   (EDM Eq. 8)."""
        return (x0 - self.c_skip(sigma) * (x0 + sigma * eps)) / self.c_out(sigma)

    # The discrete interface: sigma and x from the schedule tables (x_t = a x_0 + s eps, sigma = s / a).
    def target(self, x0, eps, t, d):
        a, s = d.coef("sqrt_alphas_cumprod", t, x0), d.coef("sqrt_one_minus_alphas_cumprod", t, x0)
        return self.network_target(x0, eps, s / a)

    def to_x0_eps(self, out, x_t, t, d):
        a, s = d.coef("sqrt_alphas_cumprod", t, x_t), d.coef("sqrt_one_minus_alphas_cumprod", t, x_t)
        sigma, x = s / a, x_t / a
        x0 = self.denoise(out, x, sigma)
        return x0, (x - x0) / sigma

    def x0_error_scale(self, snr):
        # d x0 = c_out d F at fixed x and sigma^2 = 1 / SNR, so ||d F||^2 = lambda ||d x0||^2
        return self.loss_weight(snr.rsqrt())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma_data={self.sigma_data})"
