"""What the network predicts: eps, x_0, v, EDM's F, the velocity or the score, as conversions on a path's
coefficients (alpha, sigma, d_alpha, d_sigma) at the example's time (``processes.paths.Coefs``).

Each parameterization is a small class with the same members; the core works on coefficients only, so a
parameterization needs no diffusion object (and this module imports none):

    from_x0_eps(x0, eps, c)        the network output that encodes (x0, eps): the regression target
    x0_eps(out, x_t, c)            (x0_hat, eps_hat) from the network output at x_t = alpha x0 + sigma eps
    to_x0 / to_eps / to_velocity / to_score (out, x_t, c)     derived from x0_eps
    eps_error_scale(c)             ||d out||^2 / ||d eps||^2 at fixed x_t (Kingma & Gao 2023, App. D: every
                                   objective is an eps-MSE with a weight; ``processes.weighting``)
    x0_error_scale(snr)            ||d out||^2 / ||d x0||^2 at fixed x_t, from SNR (min-SNR weighting)
    supports_zero_terminal_snr     whether x0_hat stays defined at alpha = 0

and two adapters for the discrete family, ``target(x0, eps, t, d)`` and ``to_x0_eps(out, x_t, t, d)``, which
read the coefficients from ``d.coefs(t, x)`` (any object with that method) at integer steps t.

With a = alpha, s = sigma, a' = d_alpha, s' = d_sigma, so that x_t = a x_0 + s eps:

    eps:       x0 = (x_t - s eps) / a                                (Ho et al. 2020, Eq. 11 and 15)
    x0:        eps = (x_t - a x0) / s
    v:         v = a eps - s x0;  x0 = a x_t - s v;  eps = s x_t + a v     (Salimans & Ho 2022, App. D;
               for a variance-preserving path, a^2 + s^2 = 1)
    velocity:  u = a' x0 + s' eps = dx_t/dt (Lipman et al. 2023; Liu et al. 2023); with det = a s' - s a':
               x0 = (s' x_t - s u) / det,  eps = (a u - a' x_t) / det
    score:     score = grad log p_t(x_t | x_0) = -eps / s;  eps = -s score  (Song et al. 2021, Eq. 7)
    edm:       D = c_skip x + c_out F in x = x_t / a, sigma = s / a  (Karras et al. 2022, Eq. 7)

An error in the prediction maps linearly to an error in eps at fixed x_t, which gives eps_error_scale:

    eps: 1     x0: s^2 / a^2     v: 1 / a^2 (VP)     velocity: (s' - a' s / a)^2     score: 1 / s^2
    edm: (s / a)^2 / c_out^2
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffusion_lab.processes.paths import Coefs

__all__ = [
    "Parameterization",
    "EpsPrediction",
    "X0Prediction",
    "VPrediction",
    "VelocityPrediction",
    "ScorePrediction",
    "PARAMETERIZATIONS",
    "PREDICTIONS",
    "get_prediction",
    "get_parameterization",
    "EDMPreconditioning",
]


class Parameterization:
    """Interface: a mapping between the network output and (x_0, eps) at a path's coefficients.

    Attributes:
        name: the config name (``objective.parameterization`` / ``objective.prediction``).
        supports_zero_terminal_snr: False where x0_hat divides by alpha, which is 0 at the last step of a
            zero-terminal-SNR schedule (Lin et al. 2024, Sec. 3.2) and at t = 1 of the linear and GVP paths.
    """

    name: str = ""
    supports_zero_terminal_snr: bool = True

    # ---- the core: coefficients only
    def from_x0_eps(self, x0: Tensor, eps: Tensor, c: Coefs) -> Tensor:
        """The network output that encodes (x0, eps) at coefficients c: the regression target."""
        raise NotImplementedError

    def x0_eps(self, out: Tensor, x_t: Tensor, c: Coefs) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat), each shaped like x_t, from the network output ``out`` at x_t."""
        raise NotImplementedError

    def eps_error_scale(self, c: Coefs) -> Tensor:
        """||d out||^2 / ||d eps||^2 at fixed x_t (broadcast like c.alpha)."""
        raise NotImplementedError

    def to_x0(self, out: Tensor, x_t: Tensor, c: Coefs) -> Tensor:
        return self.x0_eps(out, x_t, c)[0]

    def to_eps(self, out: Tensor, x_t: Tensor, c: Coefs) -> Tensor:
        return self.x0_eps(out, x_t, c)[1]

    def to_velocity(self, out: Tensor, x_t: Tensor, c: Coefs) -> Tensor:
        """The probability-flow ODE drift dx_t/dt = d_alpha x0_hat + d_sigma eps_hat (E[dx_t/dt | x_t])."""
        d_alpha, d_sigma = c.derivatives()
        x0, eps = self.x0_eps(out, x_t, c)
        return d_alpha * x0 + d_sigma * eps

    def to_score(self, out: Tensor, x_t: Tensor, c: Coefs) -> Tensor:
        """grad_x log p_t(x_t) = -eps_hat / sigma (Tweedie; Song et al. 2021, Eq. 7)."""
        return -self.to_eps(out, x_t, c) / c.sigma

    # ---- adapters for the discrete family: coefficients of integer steps t from ``d.coefs(t, x)``
    def target(self, x0: Tensor, eps: Tensor, t: Tensor, d: Any) -> Tensor:
        """The regression target of the simple loss at discrete steps t of ``d``, shaped like x0."""
        return self.from_x0_eps(x0, eps, d.coefs(t, x0))

    def to_x0_eps(self, out: Tensor, x_t: Tensor, t: Tensor, d: Any) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) at discrete steps t of ``d``."""
        return self.x0_eps(out, x_t, d.coefs(t, x_t))

    def x0_error_scale(self, snr: Tensor) -> Tensor:
        """||target - pred||^2 / ||x0 - x0_hat||^2 at fixed x_t, per example: (B,) from SNR_t (B,).

        Min-SNR weighting (Hang et al. 2023) divides by it to put min(SNR, gamma) on the x_0 error.
        """
        raise NotImplementedError(f"{self.name}-prediction has no min-SNR conversion on a discrete schedule")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EpsPrediction(Parameterization):
    name = "eps"
    supports_zero_terminal_snr = False  # x0 = (x_t - s eps) / a with a = 0

    def from_x0_eps(self, x0, eps, c):
        return eps

    def x0_eps(self, out, x_t, c):
        return (x_t - c.sigma * out) / c.alpha, out

    def eps_error_scale(self, c):
        return torch.ones_like(c.alpha)

    def x0_error_scale(self, snr):
        return snr


class X0Prediction(Parameterization):
    name = "x0"

    def from_x0_eps(self, x0, eps, c):
        return x0

    def x0_eps(self, out, x_t, c):
        return out, (x_t - c.alpha * out) / c.sigma

    def eps_error_scale(self, c):
        return (c.sigma / c.alpha) ** 2

    def x0_error_scale(self, snr):
        return torch.ones_like(snr)


class VPrediction(Parameterization):
    """v = a eps - s x0 (Salimans & Ho 2022); the inverse formulas assume a^2 + s^2 = 1 (a VP path)."""

    name = "v"

    def from_x0_eps(self, x0, eps, c):
        return c.alpha * eps - c.sigma * x0

    def x0_eps(self, out, x_t, c):
        a, s = c.alpha, c.sigma
        return a * x_t - s * out, s * x_t + a * out

    def eps_error_scale(self, c):
        return 1.0 / c.alpha**2

    def x0_error_scale(self, snr):
        return snr + 1.0


class VelocityPrediction(Parameterization):
    """u = d_alpha x0 + d_sigma eps, the conditional velocity (flow matching: Lipman et al. 2023, Eq. 15
    with the Gaussian path; rectified flow: eps - x0). Needs the path's derivatives."""

    name = "velocity"

    def from_x0_eps(self, x0, eps, c):
        d_alpha, d_sigma = c.derivatives()
        return d_alpha * x0 + d_sigma * eps

    def x0_eps(self, out, x_t, c):
        d_alpha, d_sigma = c.derivatives()
        det = c.alpha * d_sigma - c.sigma * d_alpha  # > 0 where the SNR decreases
        return (d_sigma * x_t - c.sigma * out) / det, (c.alpha * out - d_alpha * x_t) / det

    def to_velocity(self, out, x_t, c):
        return out

    def eps_error_scale(self, c):
        d_alpha, d_sigma = c.derivatives()
        return (d_sigma - d_alpha * c.sigma / c.alpha) ** 2


class ScorePrediction(Parameterization):
    """score = -eps / sigma (the conditional score of x_t given x_0; SiT's "score" model)."""

    name = "score"
    supports_zero_terminal_snr = False

    def from_x0_eps(self, x0, eps, c):
        return -eps / c.sigma

    def x0_eps(self, out, x_t, c):
        eps = -c.sigma * out
        return (x_t - c.sigma * eps) / c.alpha, eps

    def to_score(self, out, x_t, c):
        return out

    def eps_error_scale(self, c):
        return 1.0 / c.sigma**2


# what a discrete GaussianDiffusion accepts (objective.parameterization)
PARAMETERIZATIONS: dict[str, type[Parameterization]] = {
    cls.name: cls for cls in (EpsPrediction, X0Prediction, VPrediction)
}
# what a continuous objective accepts (objective.prediction); "noise" is SiT's name for eps
PREDICTIONS: dict[str, type[Parameterization]] = {
    "velocity": VelocityPrediction,
    "noise": EpsPrediction,
    "eps": EpsPrediction,
    "score": ScorePrediction,
    "x0": X0Prediction,
}


def get_parameterization(name: str | Parameterization) -> Parameterization:
    if isinstance(name, Parameterization):
        return name
    if name not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization '{name}'; valid names: {', '.join(PARAMETERIZATIONS)}")
    return PARAMETERIZATIONS[name]()


def get_prediction(name: str | Parameterization) -> Parameterization:
    """The parameterization of a continuous objective: velocity, noise (= eps), score or x0."""
    if isinstance(name, Parameterization):
        return name
    if name not in PREDICTIONS:
        raise ValueError(f"unknown prediction '{name}'; valid: {', '.join(PREDICTIONS)}")
    return PREDICTIONS[name]()


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

    # The coefficient interface: x = x_t / a and sigma = s / a (the VE view of the path).
    def from_x0_eps(self, x0, eps, c):
        return self.network_target(x0, eps, c.sigma / c.alpha)

    def x0_eps(self, out, x_t, c):
        sigma, x = c.sigma / c.alpha, x_t / c.alpha
        x0 = self.denoise(out, x, sigma)
        return x0, (x - x0) / sigma

    def eps_error_scale(self, c):
        sigma = c.sigma / c.alpha
        return sigma**2 / self.c_out(sigma) ** 2

    def x0_error_scale(self, snr):
        # d x0 = c_out d F at fixed x and sigma^2 = 1 / SNR, so ||d F||^2 = lambda ||d x0||^2
        return self.loss_weight(snr.rsqrt())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma_data={self.sigma_data})"
