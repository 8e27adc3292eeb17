"""What the network predicts: epsilon, x_0 or v.

Each parameterization is a small class with the same members, so a new one (e.g. EDM's F-prediction) is
one new class in this file and nothing else changes:

    target(x0, eps, t, d)          the regression target of the simple loss
    to_x0_eps(out, x_t, t, d)      (x0_hat, eps_hat) from the network output
    x0_error_scale(snr)            ||target error||^2 / ||x0 error||^2 at fixed x_t (for min-SNR weighting)
    supports_zero_terminal_snr     whether x0_hat stays defined at alpha_bar = 0

where ``d`` is the :class:`~diffusion_lab.diffusion.GaussianDiffusion` that holds the schedule tables.
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
    from diffusion_lab.diffusion import GaussianDiffusion

__all__ = [
    "Parameterization",
    "EpsPrediction",
    "X0Prediction",
    "VPrediction",
    "PARAMETERIZATIONS",
    "get_parameterization",
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
