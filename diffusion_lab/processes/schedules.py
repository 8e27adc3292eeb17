"""Noise schedules: named recipes for beta_1..beta_T.

Every schedule is computed in float64 and returned as a :class:`Schedule` holding

    betas           beta_t                       (T,)
    alphas          alpha_t = 1 - beta_t         (T,)
    alphas_cumprod  alpha_bar_t = prod_s alpha_s (T,)
    log_snr         log(alpha_bar_t / (1 - alpha_bar_t))

Index convention: entry ``t`` (0-based) is the paper's step ``t + 1``.

References
----------
- linear:    Ho et al. 2020 (DDPM), Sec. 4; scaled by 1000/T as in Nichol & Dhariwal 2021 (Improved DDPM).
- cosine:    Nichol & Dhariwal 2021, Eq. 17, betas clipped at 0.999.
- sigmoid:   Jabri et al. 2022 (RIN) / Chen 2023 ("On the importance of noise scheduling"), Algorithm 1.
- quadratic: linear in sqrt(beta) (the "scaled_linear" schedule of latent diffusion).
- geometric: betas in geometric progression between ``beta_start`` and ``beta_end``.
- log_snr_shift: Hoogeboom et al. 2023 ("simple diffusion"), Sec. 3.1: log SNR'(t) = log SNR(t) + shift,
  i.e. alpha_bar' = sigmoid(logit(alpha_bar) + shift); a negative shift spends more of the chain (and of
  training, with t uniform) at high noise, where the global layout of an image is decided.
- zero_terminal_snr: Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed"),
  Algorithm 1: shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "make_schedule",
    "SCHEDULES",
    "rescale_zero_terminal_snr",
    "shift_log_snr",
    "betas_from_alphas_cumprod",
]


@dataclass(frozen=True)
class Schedule:
    """A discrete noise schedule; all tensors are float64 of shape (T,)."""

    name: str
    betas: Tensor

    def __post_init__(self):
        b = self.betas
        if b.ndim != 1 or b.numel() < 1:
            raise ValueError(f"schedule '{self.name}': betas must be a non-empty 1-D tensor")
        if b.dtype != torch.float64:
            object.__setattr__(self, "betas", b.to(torch.float64))
        b = self.betas
        if not torch.isfinite(b).all() or (b <= 0).any() or (b > 1).any():
            raise ValueError(
                f"schedule '{self.name}': every beta must lie in (0, 1]; got min {b.min().item():.3g}, "
                f"max {b.max().item():.3g}. Check the schedule's parameters."
            )

    @property
    def timesteps(self) -> int:
        return self.betas.numel()

    @property
    def alphas(self) -> Tensor:
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> Tensor:
        return torch.cumprod(self.alphas, dim=0)

    @property
    def log_snr(self) -> Tensor:
        """log SNR(t) = log(alpha_bar_t) - log(1 - alpha_bar_t); -inf where alpha_bar_t = 0."""
        ab = self.alphas_cumprod
        return torch.log(ab) - torch.log1p(-ab)


# ---------------------------------------------------------------------------------------------------------
# Recipes: each returns float64 betas of length T.
# ---------------------------------------------------------------------------------------------------------


def _linear(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear schedule; the end points are given for T = 1000 and scaled by 1000/T."""
    scale = 1000.0 / timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=torch.float64)


def _quadratic(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear in sqrt(beta) between the (1000/T-scaled) end points."""
    scale = 1000.0 / timesteps
    s = torch.linspace(
        math.sqrt(scale * beta_start), math.sqrt(scale * beta_end), timesteps, dtype=torch.float64
    )
    return s**2


def _geometric(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """beta_t = beta_start * (beta_end / beta_start)^((t-1)/(T-1)), end points scaled by 1000/T."""
    scale = 1000.0 / timesteps
    return torch.logspace(
        math.log10(scale * beta_start), math.log10(scale * beta_end), timesteps, dtype=torch.float64
    )


def _from_alpha_bar(fn: Callable[[Tensor], Tensor], timesteps: int, max_beta: float) -> Tensor:
    """beta_t = 1 - f(t/T) / f((t-1)/T), clipped at ``max_beta`` (Improved DDPM, Eq. 17 and below)."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = fn(t)
    betas = 1.0 - f[1:] / f[:-1]
    return betas.clamp(max=max_beta)


def _cosine(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T) + s) / (1 + s) * pi/2)   (Improved DDPM, Eq. 17)."""

    def f(u: Tensor) -> Tensor:
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return _from_alpha_bar(f, timesteps, max_beta)


def _sigmoid(
    timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
) -> Tensor:
    """alpha_bar(t) = (v_end - sigmoid((t (end - start) + start) / tau)) / (v_end - v_start)
    (Chen 2023, Algorithm 1; Jabri et al. 2022)."""
    if not end > start:
        raise ValueError(f"schedule 'sigmoid': needs end > start, got start={start}, end={end}")
    if tau <= 0:
        raise ValueError(f"schedule 'sigmoid': needs tau > 0, got tau={tau}")
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))

    def f(u: Tensor) -> Tensor:
        return (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)

    return _from_alpha_bar(f, timesteps, max_beta)


MAX_BETA = 0.999

SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "linear": _linear,
    "cosine": _cosine,
    "sigmoid": _sigmoid,
    "quadratic": _quadratic,
    "geometric": _geometric,
}


def betas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """Invert alpha_bar_t = prod_s (1 - beta_s):  beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}."""
    ab = alphas_cumprod.to(torch.float64)
    prev = torch.cat([ab.new_ones(1), ab[:-1]])
    return 1.0 - ab / prev


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024, Algorithm 1: make alpha_bar_T = 0 while keeping alpha_bar_1 unchanged."""
    sqrt_ab = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    return betas_from_alphas_cumprod(sqrt_ab**2)


def shift_log_snr(betas: Tensor, shift: float) -> Tensor:
    """Hoogeboom et al. 2023, Sec. 3.1: log SNR(t) + shift at every t.

    alpha_bar'_t = sigmoid(logit(alpha_bar_t) + shift), then beta'_t = 1 - alpha_bar'_t / alpha_bar'_{t-1}.
    """
    alphas_cumprod = torch.cumprod(1.0 - betas, 0)
    shifted = torch.sigmoid(torch.logit(alphas_cumprod) + shift)
    return betas_from_alphas_cumprod(shifted).clamp(max=MAX_BETA)


def make_schedule(
    name: str, timesteps: int = 1000, zero_terminal_snr: bool = False, log_snr_shift: float = 0.0, **kwargs
) -> Schedule:
    """Build a named schedule.

    Args:
        name: one of ``SCHEDULES`` (linear, cosine, sigmoid, quadratic, geometric).
        timesteps: T, the number of diffusion steps (>= 2).
        zero_terminal_snr: rescale so that alpha_bar_T = 0 exactly (Lin et al. 2024), after any shift.
        log_snr_shift: add this to log SNR at every step (Hoogeboom et al. 2023); < 0 means noisier.
        **kwargs: the recipe's own parameters (e.g. ``beta_start``, ``s``, ``tau``).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule '{name}'; valid names: {', '.join(sorted(SCHEDULES))}")
    if not isinstance(timesteps, int) or timesteps < 2:
        raise ValueError(f"schedule '{name}': timesteps must be an integer >= 2, got {timesteps!r}")
    for key in ("beta_start", "beta_end"):
        if key in kwargs and not 0 < kwargs[key] < 1:
            raise ValueError(f"schedule '{name}': {key} must lie in (0, 1), got {kwargs[key]}")
    try:
        betas = SCHEDULES[name](timesteps, **kwargs)
    except TypeError as e:
        raise ValueError(f"schedule '{name}': invalid parameters {sorted(kwargs)}: {e}") from None
    # The 1000/T scaling pushes betas past 1 for very short chains (T < 50): cap them like the cosine's.
    betas = betas.clamp(max=MAX_BETA)
    if not isinstance(log_snr_shift, int | float) or not math.isfinite(log_snr_shift):
        raise ValueError(f"schedule '{name}': log_snr_shift must be a finite number, got {log_snr_shift!r}")
    if log_snr_shift != 0:
        betas = shift_log_snr(betas, float(log_snr_shift))
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return Schedule(name=name, betas=betas)
