"""Timestep grids: which training steps a sampler evaluates the network at (the grid is an argument).

Every sampler takes ``steps`` (how many network evaluations) and ``grid`` (where they go) and respaces the
diffusion to the grid's steps (Improved DDPM Sec. 4: betas rebuilt from the kept alpha-bars, which works for
any kept subset), so a sampler and a grid are chosen independently.

Convention: ``make_grid(name, diffusion, steps, **opts)`` returns a 1-D int64 tensor of ``steps`` distinct
steps of ``diffusion`` (0-based: 0 is the papers' t = 1, T - 1 the last step), strictly **descending**, in
the order the sampler visits them: the network runs at grid[0] first and at grid[-1] last, and the step
from grid[-1] goes to clean data. ``steps=None`` or ``steps=T`` keeps all T steps on every grid.

Grids (T = number of steps of the diffusion, n = steps, i = 0, ..., n - 1):

    uniform         round(linspace(0, T - 1, n)): evenly spaced, first and last step included (Improved
                    DDPM's ``space_timesteps``); n = 1 gives [T - 1]. Also a comma list of counts per equal
                    section, e.g. steps="10,10,5".
    leading         i * (T // n) + steps_offset (diffusers DDIMScheduler, ``timestep_spacing="leading"``;
                    DDIM's stride). Starts below T - 1: the first step sees less noise than x_T has.
    trailing        round(T - i T / n) - 1 (diffusers ``"trailing"``); starts at T - 1 (Lin et al. 2024,
                    Table 2).
    time_uniform    round(linspace(0, T - 1, n + 1))[1:] (diffusers DPM-Solver ``"linspace"``): T - 1 down
                    to about T / n, leaving step 0 out; the last step jumps to clean data from there.
    logsnr_uniform  the steps nearest to n values of lambda = log(alpha_t / sigma_t) (half the log-SNR)
                    evenly spaced from lambda_{T-1} to lambda_0 (DPM-Solver, Lu et al. 2022a, Sec. 3.3);
                    includes 0 and T - 1.
    karras          the steps nearest (in log sigma) to the sigmas of Karras et al. 2022, Eq. 5
                    (``karras_sigmas``, rho = 7), sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t);
                    sigma_min / sigma_max default to sigma_0 / sigma_{T-1}, and then 0 and T - 1 are in.

The two nearest-step grids can map several targets to one step where the grid is finer than the
schedule's steps (e.g. the high-noise end of the cosine schedule, whose last betas are clipped to 0.999);
such collisions are pushed apart to the neighbouring steps, so the grid keeps n distinct steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffusion_lab.processes.diffusion import GaussianDiffusion
from diffusion_lab.processes.paths import karras_sigmas  # EDM Eq. 5; re-exported here

__all__ = ["GRIDS", "make_grid", "karras_sigmas", "half_log_snr", "sigmas"]

GridFn = Callable[..., Tensor]  # grid_fn(diffusion, n, **opts) -> (n,) int64, strictly descending


def half_log_snr(alphas_cumprod: Tensor) -> Tensor:
    """lambda_t = log(alpha_t / sigma_t) = 0.5 (log alpha_bar_t - log(1 - alpha_bar_t)), float64, (T,)."""
    ab = alphas_cumprod.to(torch.float64)
    return 0.5 * (torch.log(ab) - torch.log1p(-ab))


def sigmas(diffusion: GaussianDiffusion) -> Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of each step (the EDM noise level), float64 (T,)."""
    ab = diffusion.schedule.alphas_cumprod.to(torch.float64)
    return ((1.0 - ab) / ab).sqrt()


# ------------------------------------------------------------------------------------ closed-form grids


def uniform(diffusion: GaussianDiffusion, n: int) -> Tensor:
    T = diffusion.num_timesteps
    if n == 1:
        return torch.tensor([T - 1])
    # points (T - 1) / (n - 1) >= 1 apart round to distinct integers
    return torch.linspace(0, T - 1, n, dtype=torch.float64).round().long().flip(0)


def uniform_sections(diffusion: GaussianDiffusion, counts: list[int]) -> Tensor:
    """Improved DDPM's section list: T cut into len(counts) equal sections, counts[j] spread in each."""
    T = diffusion.num_timesteps
    size, extra = divmod(T, len(counts))
    out, start = [], 0
    for j, count in enumerate(counts):
        m = size + (1 if j < extra else 0)
        if not 1 <= count <= m:
            raise ValueError(f"grid uniform: cannot take {count} steps from a section of {m} steps (T={T})")
        picks = [0] if count == 1 else torch.linspace(0, m - 1, count, dtype=torch.float64).round().long()
        out.extend(start + int(p) for p in picks)
        start += m
    return torch.tensor(sorted(set(out), reverse=True))


def leading(diffusion: GaussianDiffusion, n: int, steps_offset: int = 0) -> Tensor:
    T = diffusion.num_timesteps
    top = (n - 1) * (T // n)
    if not 0 <= steps_offset <= T - 1 - top:
        raise ValueError(
            f"grid leading: steps_offset must lie in [0, {T - 1 - top}] for {n} steps of {T}, "
            f"got {steps_offset}"
        )
    return (torch.arange(n) * (T // n) + steps_offset).flip(0)


def trailing(diffusion: GaussianDiffusion, n: int) -> Tensor:
    T = diffusion.num_timesteps
    # = diffusers' round(arange(T, 0, -T / n)) - 1, without arange's float end point
    return (T - torch.arange(n, dtype=torch.float64) * (T / n)).round().long() - 1


def time_uniform(diffusion: GaussianDiffusion, n: int) -> Tensor:
    T = diffusion.num_timesteps
    return torch.linspace(0, T - 1, n + 1, dtype=torch.float64).round().long()[1:].flip(0)


# ------------------------------------------------------------------------------------- nearest-step grids


def _nearest_distinct(table: Tensor, targets: Tensor, pin_first: bool, pin_last: bool) -> Tensor:
    """For targets (n,) descending in t, the nearest steps of a monotone ``table`` (T,), made distinct.

    Ties and collisions are resolved by pushing steps apart (bottom up, then top down within [0, T - 1]);
    ``pin_first`` / ``pin_last`` force the ends to steps T - 1 / 0.
    """
    T, n = table.numel(), targets.numel()
    idx = (table[None, :] - targets.flip(0)[:, None]).abs().argmin(dim=1).tolist()  # ascending in t
    if pin_last:
        idx[0] = 0
    if pin_first:
        idx[-1] = T - 1
    for j in range(1, n):  # strictly increasing, bottom up
        idx[j] = max(idx[j], idx[j - 1] + 1)
    idx[-1] = min(idx[-1], T - 1)
    for j in range(n - 2, -1, -1):  # and within [0, T - 1], top down
        idx[j] = min(idx[j], idx[j + 1] - 1)
    return torch.tensor(idx[::-1])


def _finite(x: Tensor) -> Tensor:
    """x with +-inf (a zero-terminal-SNR end) replaced by its finite neighbour's value."""
    finite = x[torch.isfinite(x)]
    return x.clamp(min=float(finite.min()), max=float(finite.max()))


def logsnr_uniform(diffusion: GaussianDiffusion, n: int) -> Tensor:
    T = diffusion.num_timesteps
    if n == 1:
        return torch.tensor([T - 1])
    lam = _finite(half_log_snr(diffusion.schedule.alphas_cumprod))  # (T,) decreasing in t
    targets = torch.linspace(float(lam[-1]), float(lam[0]), n, dtype=torch.float64)  # descending in t
    return _nearest_distinct(lam, targets, pin_first=True, pin_last=True)


def karras(
    diffusion: GaussianDiffusion,
    n: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
) -> Tensor:
    log_sigma = _finite(sigmas(diffusion).log())  # (T,) increasing in t
    lo = float(log_sigma[0].exp()) if sigma_min is None else float(sigma_min)
    hi = float(log_sigma[-1].exp()) if sigma_max is None else float(sigma_max)
    targets = karras_sigmas(n, lo, hi, rho).log()  # descending in t
    return _nearest_distinct(
        log_sigma, targets, pin_first=sigma_max is None, pin_last=sigma_min is None and n > 1
    )


GRIDS: dict[str, GridFn] = {
    "uniform": uniform,
    "leading": leading,
    "trailing": trailing,
    "time_uniform": time_uniform,
    "logsnr_uniform": logsnr_uniform,
    "karras": karras,
}


def make_grid(name: str, diffusion: GaussianDiffusion, steps: int | str | None, **opts) -> Tensor:
    """The steps of ``diffusion`` to evaluate the network at: (n,) int64, strictly descending (see top).

    Args:
        name: a key of ``GRIDS``.
        diffusion: the diffusion whose steps 0, ..., T - 1 the grid picks from (possibly itself respaced).
        steps: n in [1, T]; None = all T steps; for ``uniform`` also a comma list such as "10,10,5".
        **opts: the grid's options (``leading``: steps_offset; ``karras``: sigma_min, sigma_max, rho).
    """
    if name not in GRIDS:
        raise ValueError(f"unknown grid '{name}'; valid grids: {', '.join(GRIDS)}")
    T = diffusion.num_timesteps
    if isinstance(steps, str) and "," in steps:
        if name != "uniform":
            raise ValueError(f"steps='{steps}' (a section list) needs grid uniform, got grid {name}")
        grid = uniform_sections(diffusion, [int(c) for c in steps.split(",")])
    else:
        if steps is None:
            steps = T
        if isinstance(steps, str) and steps.strip().isdigit():
            steps = int(steps)
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
            raise ValueError(
                f"steps must be an int in [1, {T}] (the diffusion's T) or None for all steps, got {steps!r}"
            )
        grid = torch.arange(T - 1, -1, -1) if steps == T else GRIDS[name](diffusion, steps, **opts)
    grid = grid.to(torch.long)
    if grid.ndim != 1 or (grid.numel() > 1 and not bool((grid[1:] < grid[:-1]).all())):
        raise RuntimeError(f"grid {name} is not strictly descending: {grid.tolist()[:8]}...")
    if grid.numel() == 0 or int(grid.min()) < 0 or int(grid.max()) > T - 1:
        raise RuntimeError(f"grid {name} leaves [0, {T - 1}]: {grid.tolist()[:8]}...")
    return grid
