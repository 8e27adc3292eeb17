"""What the network predicts: epsilon, x_0 or v.

Each parameterization is a small class with the same two methods, so a new one touches this file only:

    target(x0, eps, t, d)        the regression target of the simple loss
    to_x0_eps(out, x_t, t, d)    (x0_hat, eps_hat) from the network output

where ``d`` is the :class:`~diffusion_lab.diffusion.GaussianDiffusion` that holds the schedule tables.
With a = sqrt(alpha_bar_t) and s = sqrt(1 - alpha_bar_t), so that x_t = a x_0 + s eps:

    eps:  x0 = (x_t - s eps) / a                              (Ho et al. 2020, Eq. 11 and 15)
    x0:   eps = (x_t - a x0) / s
    v:    v = a eps - s x0;  x0 = a x_t - s v;  eps = s x_t + a v   (Salimans & Ho 2022, Sec. 4 and App. D)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    """Interface: a mapping between the network output and (x_0, eps)."""

    name: str = ""

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, d: GaussianDiffusion) -> Tensor:
        raise NotImplementedError

    def to_x0_eps(self, out: Tensor, x_t: Tensor, t: Tensor, d: GaussianDiffusion) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EpsPrediction(Parameterization):
    name = "eps"

    def target(self, x0, eps, t, d):
        return eps

    def to_x0_eps(self, out, x_t, t, d):
        a, s = d.coef("sqrt_alphas_cumprod", t, x_t), d.coef("sqrt_one_minus_alphas_cumprod", t, x_t)
        return (x_t - s * out) / a, out


class X0Prediction(Parameterization):
    name = "x0"

    def target(self, x0, eps, t, d):
        return x0

    def to_x0_eps(self, out, x_t, t, d):
        a, s = d.coef("sqrt_alphas_cumprod", t, x_t), d.coef("sqrt_one_minus_alphas_cumprod", t, x_t)
        return out, (x_t - a * out) / s


class VPrediction(Parameterization):
    name = "v"

    def target(self, x0, eps, t, d):
        a, s = d.coef("sqrt_alphas_cumprod", t, x0), d.coef("sqrt_one_minus_alphas_cumprod", t, x0)
        return a * eps - s * x0

    def to_x0_eps(self, out, x_t, t, d):
        a, s = d.coef("sqrt_alphas_cumprod", t, x_t), d.coef("sqrt_one_minus_alphas_cumprod", t, x_t)
        return a * x_t - s * out, s * x_t + a * out


PARAMETERIZATIONS: dict[str, type[Parameterization]] = {
    cls.name: cls for cls in (EpsPrediction, X0Prediction, VPrediction)
}


def get_parameterization(name: str | Parameterization) -> Parameterization:
    if isinstance(name, Parameterization):
        return name
    if name not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization '{name}'; valid names: {', '.join(PARAMETERIZATIONS)}")
    return PARAMETERIZATIONS[name]()
