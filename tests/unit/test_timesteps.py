"""Timestep grids against their closed forms (diffusers' and the papers' formulas written out here)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion_lab.processes.diffusion import GaussianDiffusion
from diffusion_lab.processes.schedules import make_schedule
from diffusion_lab.samplers.timesteps import GRIDS, half_log_snr, karras_sigmas, make_grid, sigmas

_CACHE: dict[tuple, GaussianDiffusion] = {}


def diffusion(schedule: str = "linear", T: int = 1000, zero_terminal_snr: bool = False) -> GaussianDiffusion:
    key = (schedule, T, zero_terminal_snr)
    if key not in _CACHE:
        _CACHE[key] = GaussianDiffusion(
            make_schedule(schedule, T, zero_terminal_snr=zero_terminal_snr),
            parameterization="v" if zero_terminal_snr else "eps",
        )
    return _CACHE[key]


def steps_of(name, d, n, **opts) -> list[int]:
    return make_grid(name, d, n, **opts).tolist()


# ------------------------------------------------------------------------------------ closed forms


def test_uniform_is_evenly_spaced_with_both_ends():
    d = diffusion(T=1000)
    assert steps_of("uniform", d, 10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    for n in (2, 7, 50, 333):
        expect = np.round(np.linspace(0, 999, n))[::-1].astype(int).tolist()
        assert steps_of("uniform", d, n) == expect
    assert steps_of("uniform", d, 1) == [999]  # one step starts from the noise end
    # Improved DDPM's section list: 10 steps over [0, 500), 5 over [500, 1000)
    assert steps_of("uniform", d, "10,5") == (
        [999, 874, 750, 625, 500] + np.round(np.linspace(0, 499, 10))[::-1].astype(int).tolist()
    )


@pytest.mark.parametrize("T, n", [(1000, 10), (1000, 20), (1000, 30), (1000, 7), (50, 10), (50, 7), (50, 1)])
def test_leading_matches_diffusers(T, n):
    """diffusers DDIMScheduler, "leading" spacing: (arange(0, n) * (T // n)).round()[::-1] + steps_offset."""
    d = diffusion(T=T)
    for offset in (0, 1):
        expect = ((np.arange(0, n) * (T // n)).round()[::-1] + offset).astype(np.int64).tolist()
        assert steps_of("leading", d, n, steps_offset=offset) == expect
    assert steps_of("leading", diffusion(T=1000), 10) == list(range(900, -1, -100))  # DDIM's stride
    with pytest.raises(ValueError, match="steps_offset"):
        make_grid("leading", d, n, steps_offset=T)


@pytest.mark.parametrize("T, n", [(1000, 10), (1000, 20), (1000, 30), (1000, 7), (50, 10), (50, 7), (50, 1)])
def test_trailing_matches_diffusers(T, n):
    """diffusers DDIMScheduler, timestep_spacing="trailing": round(arange(T, 0, -T / n)) - 1."""
    expect = (np.round(np.arange(T, 0, -T / n)) - 1).astype(np.int64).tolist()
    assert len(expect) == n
    got = steps_of("trailing", diffusion(T=T), n)
    assert got == expect and got[0] == T - 1  # starts at the last step (Lin et al. 2024, Table 2)
    assert steps_of("trailing", diffusion(T=1000), 10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]


@pytest.mark.parametrize("T, n", [(1000, 20), (1000, 7), (50, 10), (50, 1)])
def test_time_uniform_matches_diffusers_linspace(T, n):
    """diffusers DPMSolverMultistepScheduler, "linspace": linspace(0, T - 1, n + 1).round()[::-1][:-1]."""
    expect = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64).tolist()
    assert steps_of("time_uniform", diffusion(T=T), n) == expect
    assert steps_of("time_uniform", diffusion(T=1000), 20)[-2:] == [100, 50]


def test_karras_sigmas_eq5():
    """Karras et al. 2022, Eq. 5, as k-diffusion's get_sigmas_karras writes it (without the final 0)."""
    n, lo, hi, rho = 7, 0.002, 80.0, 7.0
    ramp = np.linspace(0, 1, n)
    expect = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    got = karras_sigmas(n, lo, hi, rho)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-12)
    assert got[0].item() == pytest.approx(80.0) and got[-1].item() == pytest.approx(0.002)
    mid = karras_sigmas(3, lo, hi, rho)[1].item()
    assert mid == pytest.approx(((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7, rel=1e-12)
    np.testing.assert_allclose(karras_sigmas(5, 1.0, 5.0, rho=1.0).numpy(), [5, 4, 3, 2, 1])  # rho 1: linear
    assert karras_sigmas(1, lo, hi).tolist() == [80.0]
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        karras_sigmas(5, 80.0, 0.002)


@pytest.mark.parametrize("T, n", [(1000, 10), (30, 13)])  # T = 30: coarse steps, where nearest in lambda
def test_logsnr_uniform_is_nearest_step_to_evenly_spaced_lambda(T, n):  # differs from nearest in SNR
    """Each step is the nearest one (in lambda) to its target lambda = log(alpha / sigma)."""
    d = diffusion("linear", T)
    lam = half_log_snr(d.schedule.alphas_cumprod)
    targets = torch.linspace(lam[-1].item(), lam[0].item(), n, dtype=torch.float64)
    expect = [int((lam - v).abs().argmin()) for v in targets]
    assert all(a > b for a, b in zip(expect, expect[1:]))  # no collisions to resolve in these cases
    got = steps_of("logsnr_uniform", d, n)
    assert got == expect and got[0] == T - 1 and got[-1] == 0
    if T == 1000:
        gaps = torch.diff(lam[got])
        assert gaps.max() / gaps.min() < 1.3  # evenly spaced in lambda up to the integer grid


def test_karras_is_nearest_step_to_eq5_sigmas():
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t); each step is the nearest in log sigma."""
    for T, n in ((30, 13), (1000, 10)):  # T = 30: coarse steps, where nearest in sigma would differ
        d = diffusion("linear", T)
        ab = d.schedule.alphas_cumprod.double()
        sig = ((1 - ab) / ab).sqrt()
        torch.testing.assert_close(sigmas(d), sig)
        targets = karras_sigmas(n, sig[0].item(), sig[-1].item(), 7.0)
        expect = [int((sig.log() - math.log(v)).abs().argmin()) for v in targets.tolist()]
        assert all(a > b for a, b in zip(expect, expect[1:]))  # no collisions to resolve here
        got = steps_of("karras", d, n)
        assert got == expect and got[0] == T - 1 and got[-1] == 0
    # rho moves the steps: a larger rho spends more of them at low noise
    assert sum(steps_of("karras", d, 10, rho=20.0)) < sum(got) < sum(steps_of("karras", d, 10, rho=2.0))
    # an explicit sigma range: the ends are the nearest steps to sigma_min and sigma_max
    lo, hi = sig[100].item(), sig[800].item()
    assert steps_of("karras", d, 5, sigma_min=lo, sigma_max=hi)[::4] == [800, 100]


# ---------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize(
    "schedule, T, ztsnr",
    [("linear", 1000, False), ("cosine", 1000, False), ("linear", 50, True), ("cosine", 7, False)],
)
def test_every_grid_is_descending_unique_and_in_range(name, schedule, T, ztsnr):
    d = diffusion(schedule, T, ztsnr)
    for n in sorted({1, 2, 3, 5, T // 2, T - 1, T}):
        g = make_grid(name, d, n)
        assert g.dtype == torch.long and g.shape == (n,), (n, g)
        assert (g[1:] < g[:-1]).all(), (n, g)  # strictly descending: unique
        assert int(g.min()) >= 0 and int(g.max()) <= T - 1
    assert steps_of(name, d, None) == steps_of(name, d, T) == list(range(T - 1, -1, -1))
    if name in ("uniform", "trailing", "logsnr_uniform", "karras", "time_uniform"):
        assert all(steps_of(name, d, n)[0] == T - 1 for n in (1, 2, 5))  # start at the noise end


def test_make_grid_rejects_bad_input():
    d = diffusion(T=50)
    with pytest.raises(ValueError, match="unknown grid 'cosine'"):
        make_grid("cosine", d, 10)
    for bad in (0, 51, -3, "ten", 2.5):
        with pytest.raises(ValueError, match=r"steps must be an int in \[1, 50\]"):
            make_grid("uniform", d, bad)
    with pytest.raises(ValueError, match="needs grid uniform"):
        make_grid("trailing", d, "10,5")
    assert steps_of("uniform", d, "7") == steps_of("uniform", d, 7)
