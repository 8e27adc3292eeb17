"""Gaussian paths: x_t = alpha(t) x_0 + sigma(t) eps, the one object behind every family.

Convention: data at t = 0, noise at t = 1 (as this project's discrete steps and diffusers' flow-matching
scheduler; facebookresearch/flow_matching, torchcfm and SiT put data at t = 1, so their t is 1 - t here).

Every path gives, for a float tensor t in [0, 1] and with outputs shaped like t:

    alpha(t), sigma(t)            the signal and noise scales
    d_alpha(t), d_sigma(t)        their time derivatives (the velocity dx_t/dt = d_alpha x_0 + d_sigma eps)
    log_snr(t)                    lambda(t) = log(alpha^2 / sigma^2), decreasing in t
    d_log_snr(t)                  d lambda / dt, analytic (finite wherever alpha, sigma > 0)
    t_from_log_snr(lam)           its inverse
    ve_sigma(t)                   sigma / alpha: the variance-exploding view x = x_t / alpha = x_0 + (sigma /
                                  alpha) eps that the sigma samplers (EDM, k-diffusion) integrate in
    t_min, t_max                  the usable range (where alpha > 0, sigma > 0 and the formulas are finite)

Instances:

    LinearPath     alpha = 1 - t, sigma = t (rectified flow, Liu et al. 2023; conditional flow matching with
                   sigma_min = 0, Lipman et al. 2023, Eq. 20 with t -> 1 - t). alpha(1) = 0: t_max = 1 is
                   the pure-noise end, where lambda = -inf and ve_sigma = inf.
    GVPPath        alpha = cos(pi t / 2), sigma = sin(pi t / 2) (the trigonometric / generalized VP
                   interpolant of Albergo & Vanden-Eijnden 2023; SiT's "GVP", Ma et al. 2024). alpha(1) = 0.
    VPSDEPath      the continuous VP-SDE of Song et al. 2021 (Eq. 33 and App. B): log alpha(t) =
                   -t^2 (beta_max - beta_min) / 4 - t beta_min / 2, sigma = sqrt(1 - alpha^2);
                   t_min = 1e-5 (sigma -> 0 at t = 0, as the paper's epsilon).
    VEPath         alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t: the VE-SDE of Song et al. 2021
                   (Eq. 31) over EDM's noise range [0.002, 80] (Karras et al. 2022, Table 1). t = 0 is
                   sigma_min, not clean data.
    DiscreteVPPath the continuous view of a T-step discrete schedule: step i (0-based) sits at t = (i + 1) / T
                   with alpha^2 = alpha_bar_i, and lambda is interpolated linearly in t between the steps
                   (so the path passes through every step exactly; the tables of GaussianDiffusion are not
                   touched). t_min = 1 / T; t_max = 1, or (T - 1) / T for a zero-terminal-SNR schedule.

``karras_sigmas`` (EDM Eq. 5) lives here too: both the EDM objective and the samplers use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Coefs",
    "GaussianPath",
    "LinearPath",
    "GVPPath",
    "VPSDEPath",
    "VEPath",
    "DiscreteVPPath",
    "PATHS",
    "get_path",
    "karras_sigmas",
]


@dataclass
class Coefs:
    """alpha, sigma and their time derivatives at some t, each broadcastable against the data (B, 1, ...).

    ``d_alpha`` / ``d_sigma`` are None where only the marginal is known (a discrete step), which is enough
    for the eps, x0, v and EDM parameterizations; velocity and score need them.
    """

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor | None = None
    d_sigma: Tensor | None = None

    def derivatives(self) -> tuple[Tensor, Tensor]:
        if self.d_alpha is None or self.d_sigma is None:
            raise ValueError(
                "this parameterization needs d alpha / dt and d sigma / dt: use it on a continuous path "
                "(objective=flow or interpolant), not on a discrete schedule's steps"
            )
        return self.d_alpha, self.d_sigma


class GaussianPath:
    """Interface: x_t = alpha(t) x_0 + sigma(t) eps for t in [t_min, t_max] (data at 0, noise at 1).

    Subclasses give ``alpha``, ``sigma``, ``d_alpha``, ``d_sigma``; ``log_snr``, ``ve_sigma`` and ``coefs``
    follow. ``t_from_log_snr`` defaults to bisection on the monotone lambda(t); paths with a closed form
    override it.
    """

    name: str = ""
    t_min: float = 0.0
    t_max: float = 1.0

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha^2 / sigma^2) = 2 (log alpha - log sigma)."""
        return 2.0 * (self.alpha(t).log() - self.sigma(t).log())

    def d_log_snr(self, t: Tensor) -> Tensor:
        """d lambda / dt = 2 (d_alpha / alpha - d_sigma / sigma), analytic (< 0: the SNR falls with t)."""
        return 2.0 * (self.d_alpha(t) / self.alpha(t) - self.d_sigma(t) / self.sigma(t))

    def ve_sigma(self, t: Tensor) -> Tensor:
        """sigma / alpha: the noise level of x = x_t / alpha = x_0 + (sigma / alpha) eps (EDM Sec. 2)."""
        return self.sigma(t) / self.alpha(t)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """t with lambda(t) = lam, by 60 bisection steps on [t_min, t_max] (lambda decreases in t)."""
        lam64 = lam.to(torch.float64)
        lo = torch.full_like(lam64, self.t_min)
        hi = torch.full_like(lam64, self.t_max)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > lam64  # still too little noise: go later
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return (0.5 * (lo + hi)).to(lam.dtype)

    def t_from_ve_sigma(self, sigma: Tensor) -> Tensor:
        """t with ve_sigma(t) = sigma (lambda = -2 log sigma)."""
        return self.t_from_log_snr(-2.0 * sigma.log())

    def coefs(self, t: Tensor, like: Tensor) -> Coefs:
        """alpha, sigma, d_alpha, d_sigma at t (B,), each shaped (B, 1, ..., 1) in ``like``'s dtype."""
        shape = (t.shape[0], *([1] * (like.ndim - 1)))
        t = t.to(like.device)

        def r(v: Tensor) -> Tensor:
            return v.to(like.dtype).reshape(shape)

        return Coefs(r(self.alpha(t)), r(self.sigma(t)), r(self.d_alpha(t)), r(self.d_sigma(t)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearPath(GaussianPath):
    """alpha = 1 - t, sigma = t (rectified flow, Liu et al. 2023, Eq. 1; velocity eps - x_0)."""

    name = "linear"

    def alpha(self, t):
        return 1.0 - t

    def sigma(self, t):
        return t.clone()

    def d_alpha(self, t):
        return torch.full_like(t, -1.0)

    def d_sigma(self, t):
        return torch.ones_like(t)

    def d_log_snr(self, t):
        # lambda = 2 log((1 - t) / t): d lambda / dt = -2 / (t (1 - t))
        return -2.0 / (t * (1.0 - t))

    def t_from_log_snr(self, lam):
        # (1 - t) / t = exp(lam / 2)  ->  t = sigmoid(-lam / 2)
        return torch.sigmoid(-0.5 * lam)


class GVPPath(GaussianPath):
    """alpha = cos(pi t / 2), sigma = sin(pi t / 2) (Albergo & Vanden-Eijnden 2023; SiT's GVP).

    Computed as alpha = sin(pi (1 - t) / 2) and sigma = sin(pi t / 2), equal in exact arithmetic: in float32
    ``0.5 * pi * t`` at t = 1 rounds above pi / 2, so cos() gives alpha(1) = -4.4e-8, a NaN log-SNR and a
    negative variance-exploding sigma, while sin(0) is exactly 0 at both ends.
    """

    name = "gvp"

    def alpha(self, t):
        return torch.sin(0.5 * math.pi * (1.0 - t))

    def sigma(self, t):
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_sigma(self, t):
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * (1.0 - t))

    def d_log_snr(self, t):
        # lambda = -2 log tan(pi t / 2): d lambda / dt = -2 pi / sin(pi t)
        return -2.0 * math.pi / torch.sin(math.pi * t)

    def t_from_log_snr(self, lam):
        # tan(pi t / 2) = exp(-lam / 2)
        return torch.atan(torch.exp(-0.5 * lam)) * (2.0 / math.pi)


class VPSDEPath(GaussianPath):
    """The VP-SDE of Song et al. 2021 (Eq. 33):
    log alpha = -t^2 (b1 - b0) / 4 - t b0 / 2, sigma^2 = 1 - alpha^2.

    Args:
        beta_min, beta_max: b0 and b1 of the linear beta(t) = b0 + t (b1 - b0) (0.1 and 20 in the paper).
        t_min: the first usable time (1e-5 in the paper's likelihood evaluation).
    """

    name = "vp_sde"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-5):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"VPSDEPath: need 0 < beta_min < beta_max (0.1, 20), got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max, self.t_min = float(beta_min), float(beta_max), float(t_min)

    def _log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _d_log_alpha(self, t):
        return -0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min  # = -beta(t) / 2

    def alpha(self, t):
        return self._log_alpha(t).exp()

    def sigma(self, t):
        return (-torch.expm1(2.0 * self._log_alpha(t))).sqrt()

    def d_alpha(self, t):
        return self.alpha(t) * self._d_log_alpha(t)

    def d_sigma(self, t):
        # sigma^2 = 1 - alpha^2  ->  d_sigma = -alpha d_alpha / sigma
        a = self.alpha(t)
        return -a * self.d_alpha(t) / self.sigma(t)

    def log_snr(self, t):
        # log(alpha^2 / (1 - alpha^2)) = -log(exp(-2 log alpha) - 1)
        return -torch.log(torch.expm1(-2.0 * self._log_alpha(t)))

    def d_log_snr(self, t):
        # lambda = -log(e^c - 1), c = -2 log alpha: d lambda / dt = -c' e^c / (e^c - 1) = -c' / sigma^2
        return 2.0 * self._d_log_alpha(t) / (-torch.expm1(2.0 * self._log_alpha(t)))

    def t_from_log_snr(self, lam):
        # -2 log alpha = log(1 + e^-lam) = c  ->  t^2 (b1 - b0) / 2 + t b0 - c = 0
        c = torch.nn.functional.softplus(-lam)
        db = self.beta_max - self.beta_min
        return (torch.sqrt(self.beta_min**2 + 2.0 * db * c) - self.beta_min) / db

    def __repr__(self):
        return f"VPSDEPath(beta_min={self.beta_min}, beta_max={self.beta_max})"


class VEPath(GaussianPath):
    """alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t (Song et al. 2021, Eq. 31; EDM's range).

    Args:
        sigma_min, sigma_max: the noise at t = 0 and t = 1 (EDM: 0.002 and 80).
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"VEPath: need 0 < sigma_min < sigma_max (0.002, 80), got {sigma_min}, {sigma_max}"
            )
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def d_alpha(self, t):
        return torch.zeros_like(t)

    def d_sigma(self, t):
        return self.sigma(t) * self._log_ratio

    def log_snr(self, t):
        return -2.0 * (math.log(self.sigma_min) + t * self._log_ratio)

    def d_log_snr(self, t):
        return torch.full_like(t, -2.0 * self._log_ratio)

    def t_from_log_snr(self, lam):
        return (-0.5 * lam - math.log(self.sigma_min)) / self._log_ratio

    def __repr__(self):
        return f"VEPath(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class DiscreteVPPath(GaussianPath):
    """The continuous view of a discrete VP schedule (T steps, alpha_bar table), for samplers and likelihoods.

    Step i (0-based) sits at t_i = (i + 1) / T with lambda_i = log(alpha_bar_i / (1 - alpha_bar_i)); between
    steps lambda is linear in t, and alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda) (so the path stays
    variance preserving). t outside [t_min, t_max] is clamped. ``nearest_step(t)`` is the step whose lambda
    is nearest to lambda(t): the step a discrete network is evaluated at for a continuous t.

    Args:
        alphas_cumprod: (T,) the schedule's alpha_bar (any dtype; kept in float64).
    """

    name = "discrete_vp"

    def __init__(self, alphas_cumprod: Tensor):
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu()
        if ab.numel() < 2:
            raise ValueError("DiscreteVPPath needs a schedule of at least 2 steps")
        self.T = ab.numel()
        lam = torch.log(ab) - torch.log1p(-ab)
        self.zero_terminal = not bool(torch.isfinite(lam[-1]))
        self.table = lam[:-1] if self.zero_terminal else lam  # finite knots only
        self.t_min = 1.0 / self.T
        self.t_max = (self.T - 1) / self.T if self.zero_terminal else 1.0

    def _locate(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(i, frac, slope): t lies between knots i and i + 1, frac of the way; slope = d lambda / dt."""
        n = self.table.numel()
        pos = (t.to(torch.float64).clamp(self.t_min, self.t_max) * self.T - 1.0).cpu()
        i = pos.floor().long().clamp(0, n - 2)
        frac = pos - i
        lo, hi = self.table[i], self.table[i + 1]
        return i, frac, (hi - lo) * self.T

    def log_snr(self, t):
        i, frac, slope = self._locate(t)
        lam = self.table[i] + frac * slope / self.T
        return lam.to(device=t.device, dtype=t.dtype)

    def d_log_snr(self, t):
        return self._locate(t)[2].to(device=t.device, dtype=t.dtype)

    def alpha(self, t):
        return torch.sigmoid(self.log_snr(t)).sqrt()

    def sigma(self, t):
        return torch.sigmoid(-self.log_snr(t)).sqrt()

    def d_alpha(self, t):
        # alpha^2 = sigmoid(lambda): d alpha = alpha sigma^2 d lambda / 2
        return 0.5 * self.alpha(t) * self.sigma(t) ** 2 * self.d_log_snr(t)

    def d_sigma(self, t):
        return -0.5 * self.sigma(t) * self.alpha(t) ** 2 * self.d_log_snr(t)

    def t_from_log_snr(self, lam):
        neg = (-self.table).contiguous()  # increasing in i
        x = (-lam.to(torch.float64)).cpu().clamp(float(neg[0]), float(neg[-1]))
        i = (torch.searchsorted(neg, x.contiguous()) - 1).clamp(0, neg.numel() - 2)
        frac = (x - neg[i]) / (neg[i + 1] - neg[i])
        t = (i + 1 + frac) / self.T
        return t.to(device=lam.device, dtype=lam.dtype)

    def nearest_step(self, t: Tensor) -> Tensor:
        """The 0-based step whose lambda is nearest to lambda(t), (B,) int64 on t's device."""
        full = self.table
        lam = self.log_snr(t).to(torch.float64).cpu()
        k = (full[None, :] - lam[:, None]).abs().argmin(dim=1)
        return k.to(t.device)

    def __repr__(self):
        return f"DiscreteVPPath(T={self.T})"


PATHS: dict[str, type[GaussianPath]] = {
    "linear": LinearPath,
    "gvp": GVPPath,
    "vp_sde": VPSDEPath,
    "ve": VEPath,
}


def get_path(name: str | GaussianPath, **kwargs) -> GaussianPath:
    """A path by name (``linear``, ``gvp``, ``vp_sde``, ``ve``) or the instance itself."""
    if isinstance(name, GaussianPath):
        return name
    if name not in PATHS:
        raise ValueError(f"unknown path '{name}'; valid paths: {', '.join(PATHS)}")
    return PATHS[name](**kwargs)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """The n noise levels of Karras et al. 2022, Eq. 5, descending from sigma_max to sigma_min, float64 (n,).

        sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i < n

    The paper's final sigma_N = 0 is left out (a sampler appends it). n = 1 gives [sigma_max].
    """
    if n < 1:
        raise ValueError(f"karras_sigmas: n must be >= 1, got {n}")
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(f"karras_sigmas: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if rho <= 0:
        raise ValueError(f"karras_sigmas: rho must be > 0 (7 in the paper), got {rho}")
    if n == 1:
        return torch.tensor([float(sigma_max)], dtype=torch.float64)
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho
