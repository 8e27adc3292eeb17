"""Training-time densities: where on the path a training example sits (data at t = 0, noise at t = 1).

    uniform        t ~ U(0, 1) (Lipman et al. 2023; Liu et al. 2023)
    logit_normal   t = sigmoid(m + s n), n ~ N(0, 1) (Esser et al. 2024, "SD3", Eq. 19):
                   pi(t) = 1 / (s sqrt(2 pi)) 1 / (t (1 - t)) exp(-(logit(t) - m)^2 / (2 s^2))
    mode           t = 1 - u - c (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1) (SD3, Eq. 20; c in [-1, 2/(pi - 2)])
    lognormal      EDM's ln(sigma) ~ N(P_mean, P_std^2) on the variance-exploding noise sigma / alpha of the
                   path (Karras et al. 2022, Table 1), mapped to t by the path's inverse log-SNR
    shift          SD3's resolution shift (Sec. 5.3.2), on any of them: t' = s t / (1 + (s - 1) t); s > 1
                   moves training towards noise, s = 1 is the identity, and 1 / s undoes s

Each density is a small class with ``sample(batch, device, generator) -> (batch,) float32`` and ``pdf(t)``,
the density of what ``sample`` returns, SD3's shift included: with t' = shift(t) and t = shift(t', 1 / s),
p'(t') = p(t) dt / dt' where dt / dt' = (1 / s) / (1 + (1 / s - 1) t')^2. With SD3's convention sigma = t
here (data at t = 0), their formulas apply as written.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_lab.processes.paths import GaussianPath

__all__ = [
    "TimeDensity",
    "UniformTime",
    "LogitNormalTime",
    "ModeTime",
    "LogNormalSigmaTime",
    "time_shift",
    "make_time_density",
    "TIME_DENSITIES",
]


def time_shift(t: Tensor, shift: float) -> Tensor:
    """SD3's time shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, Eq. 23): monotone, fixes 0 and 1."""
    if not shift > 0:
        raise ValueError(f"time shift must be > 0 (1 = none, SD3 uses 3.0 at 1024 px), got {shift}")
    return shift * t / (shift * t + (1.0 - t))  # = s t / (1 + (s - 1) t), exactly 1 at t = 1


class TimeDensity:
    """Interface: a density of training times in [0, 1], with an optional SD3 shift applied after drawing."""

    name = ""

    def __init__(self, shift: float = 1.0):
        time_shift(torch.zeros(1), shift)  # validate
        self.shift = float(shift)

    def draw(self, batch: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def density(self, t: Tensor) -> Tensor:
        """The density of ``draw`` (before the shift) at t."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form density")

    def sample(self, batch: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """(batch,) float32 training times in [0, 1]."""
        t = self.draw(batch, device, generator)
        return t if self.shift == 1.0 else time_shift(t, self.shift)

    def pdf(self, t: Tensor) -> Tensor:
        """The density of ``sample`` at t, SD3's shift included (change of variables, module docstring)."""
        if self.shift == 1.0:
            return self.density(t)
        r = 1.0 / self.shift
        return self.density(time_shift(t, r)) * r / (1.0 + (r - 1.0) * t) ** 2

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shift={self.shift})"


class UniformTime(TimeDensity):
    name = "uniform"

    def draw(self, batch, device=None, generator=None):
        return torch.rand((batch,), device=device, generator=generator)

    def density(self, t: Tensor) -> Tensor:
        return ((t >= 0) & (t <= 1)).to(t.dtype)


class LogitNormalTime(TimeDensity):
    """t = sigmoid(loc + scale n) (SD3 Eq. 19; SD3's best setting is loc 0, scale 1)."""

    name = "logit_normal"

    def __init__(self, loc: float = 0.0, scale: float = 1.0, shift: float = 1.0):
        super().__init__(shift)
        if not scale > 0:
            raise ValueError(f"logit-normal scale must be > 0 (SD3: 1.0), got {scale}")
        self.loc, self.scale = float(loc), float(scale)

    def draw(self, batch, device=None, generator=None):
        n = torch.randn((batch,), device=device, generator=generator)
        return torch.sigmoid(self.loc + self.scale * n)

    def density(self, t: Tensor) -> Tensor:
        z = (torch.logit(t) - self.loc) / self.scale
        return torch.exp(-0.5 * z**2) / (self.scale * math.sqrt(2 * math.pi) * t * (1 - t))


class ModeTime(TimeDensity):
    """SD3's mode sampling with heavy tails, t = 1 - u - c (cos^2(pi u / 2) - 1 + u) (SD3 Eq. 20)."""

    name = "mode"

    def __init__(self, mode_scale: float = 1.29, shift: float = 1.0):
        super().__init__(shift)
        if not -1.0 <= mode_scale <= 2.0 / (math.pi - 2.0):
            raise ValueError(f"mode_scale must lie in [-1, 2 / (pi - 2)] (SD3: 1.29), got {mode_scale}")
        self.mode_scale = float(mode_scale)

    def draw(self, batch, device=None, generator=None):
        return self.f(torch.rand((batch,), device=device, generator=generator))

    def f(self, u: Tensor) -> Tensor:
        """t = f(u) (SD3 Eq. 20): decreasing from f(0) = 1 to f(1) = 0 for every valid mode_scale."""
        return 1.0 - u - self.mode_scale * (torch.cos(0.5 * math.pi * u) ** 2 - 1.0 + u)

    def density(self, t: Tensor) -> Tensor:
        """1 / |f'(u)| at u = f^-1(t), f'(u) = -1 - c (1 - (pi / 2) sin(pi u)); u by 60 bisection steps."""
        t64 = t.to(torch.float64)
        lo, hi = torch.zeros_like(t64), torch.ones_like(t64)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            right = self.f(mid) > t64  # f decreases: the root lies to the right
            lo, hi = torch.where(right, mid, lo), torch.where(right, hi, mid)
        u = 0.5 * (lo + hi)
        slope = 1.0 + self.mode_scale * (1.0 - 0.5 * math.pi * torch.sin(math.pi * u))
        inside = (t64 >= 0) & (t64 <= 1)
        return torch.where(inside, 1.0 / slope, torch.zeros_like(t64)).to(t.dtype)


class LogNormalSigmaTime(TimeDensity):
    """EDM's ln(sigma) ~ N(P_mean, P_std^2) on sigma = sigma(t) / alpha(t), t = path.t_from_ve_sigma(sigma),
    kept within the path's [t_min, t_max] (Karras et al. 2022, Table 1)."""

    name = "lognormal"

    def __init__(self, path: GaussianPath, P_mean: float = -1.2, P_std: float = 1.2, shift: float = 1.0):
        super().__init__(shift)
        if not P_std > 0:
            raise ValueError(f"P_std must be > 0 (EDM: 1.2), got {P_std}")
        self.path, self.P_mean, self.P_std = path, float(P_mean), float(P_std)

    def draw(self, batch, device=None, generator=None):
        n = torch.randn((batch,), device=device, generator=generator, dtype=torch.float64)
        lam = -2.0 * (self.P_mean + self.P_std * n)  # log-SNR of sigma = exp(P_mean + P_std n)
        t = self.path.t_from_log_snr(lam).clamp(self.path.t_min, self.path.t_max)
        return t.to(torch.float32)


TIME_DENSITIES = ("uniform", "logit_normal", "mode", "lognormal")


def make_time_density(
    name: str,
    path: GaussianPath,
    loc: float = 0.0,
    scale: float = 1.0,
    mode_scale: float = 1.29,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    shift: float = 1.0,
) -> TimeDensity:
    """The density ``name`` (one of ``TIME_DENSITIES``) with its options; the others are ignored."""
    if name == "uniform":
        return UniformTime(shift)
    if name == "logit_normal":
        return LogitNormalTime(loc, scale, shift)
    if name == "mode":
        return ModeTime(mode_scale, shift)
    if name == "lognormal":
        return LogNormalSigmaTime(path, P_mean, P_std, shift)
    raise ValueError(f"unknown time density '{name}'; valid: {', '.join(TIME_DENSITIES)}")
