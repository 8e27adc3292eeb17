"""Gaussian paths (processes/paths.py) against their closed forms; parameterizations round-trip on them."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.processes.diffusion import GaussianDiffusion
from diffusion_lab.processes.parameterization import (
    EDMPreconditioning,
    EpsPrediction,
    ScorePrediction,
    VelocityPrediction,
    VPrediction,
    X0Prediction,
)
from diffusion_lab.processes.paths import DiscreteVPPath, GVPPath, LinearPath, VEPath, VPSDEPath
from diffusion_lab.processes.schedules import make_schedule

T64 = torch.float64


def _paths():
    ab = make_schedule("cosine", 100).alphas_cumprod
    return [LinearPath(), GVPPath(), VPSDEPath(0.1, 20.0), VEPath(0.002, 80.0), DiscreteVPPath(ab)]


def _inner(path, n=41):
    lo, hi = max(path.t_min, 0.02), min(path.t_max, 0.98)
    return torch.linspace(lo, hi, n, dtype=T64)


@pytest.mark.parametrize("path", _paths(), ids=lambda p: type(p).__name__)
def test_derivatives_match_finite_differences(path):
    t = _inner(path)
    if isinstance(path, DiscreteVPPath):  # piecewise linear in lambda: difference inside one segment
        t = (torch.arange(3, 95, dtype=T64) + 1.5) / path.T
    h = 1e-6
    for f, df in ((path.alpha, path.d_alpha), (path.sigma, path.d_sigma)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        torch.testing.assert_close(df(t), fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", _paths(), ids=lambda p: type(p).__name__)
def test_log_snr_and_its_inverse(path):
    t = _inner(path)
    lam = path.log_snr(t)
    torch.testing.assert_close(lam, 2 * (path.alpha(t).log() - path.sigma(t).log()), rtol=1e-9, atol=1e-9)
    assert bool((lam[1:] < lam[:-1]).all()), "lambda must decrease in t"
    torch.testing.assert_close(path.t_from_log_snr(lam), t, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(path.ve_sigma(t), path.sigma(t) / path.alpha(t))
    torch.testing.assert_close(path.t_from_ve_sigma(path.ve_sigma(t)), t, rtol=1e-7, atol=1e-9)


def test_named_formulas():
    t = torch.linspace(0.05, 0.95, 19, dtype=T64)
    lin, gvp, vp, ve = LinearPath(), GVPPath(), VPSDEPath(0.1, 20.0), VEPath(0.002, 80.0)
    torch.testing.assert_close(lin.alpha(t), 1 - t)
    torch.testing.assert_close(lin.sigma(t), t)
    torch.testing.assert_close(gvp.alpha(t), torch.cos(math.pi * t / 2))
    torch.testing.assert_close(gvp.sigma(t), torch.sin(math.pi * t / 2))
    # Song et al. 2021, Eq. 33: mean coefficient exp(-t^2 (b1 - b0) / 4 - t b0 / 2), variance 1 - alpha^2
    log_a = -(t**2) * (20.0 - 0.1) / 4 - t * 0.1 / 2
    torch.testing.assert_close(vp.alpha(t), log_a.exp())
    torch.testing.assert_close(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones_like(t))
    torch.testing.assert_close(
        ve.sigma(torch.tensor([0.0, 1.0], dtype=T64)), torch.tensor([0.002, 80.0], dtype=T64)
    )
    torch.testing.assert_close(ve.alpha(t), torch.ones_like(t))
    # the linear path's velocity is eps - x_0
    x0, eps = torch.randn(5, dtype=T64), torch.randn(5, dtype=T64)
    tt = torch.full((5,), 0.3, dtype=T64)
    torch.testing.assert_close(lin.d_alpha(tt) * x0 + lin.d_sigma(tt) * eps, eps - x0)


def test_discrete_view_passes_through_every_step():
    sched = make_schedule("linear", 200)
    d = GaussianDiffusion(sched)
    path = d.path()
    t = (torch.arange(200, dtype=T64) + 1) / 200
    torch.testing.assert_close(path.alpha(t) ** 2, sched.alphas_cumprod, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(path.log_snr(t), sched.log_snr, rtol=1e-10, atol=1e-10)
    assert path.nearest_step(t).tolist() == list(range(200))
    assert path.t_min == 1 / 200 and path.t_max == 1.0


def test_discrete_view_of_zero_terminal_snr_stops_before_the_end():
    path = DiscreteVPPath(make_schedule("cosine", 50, zero_terminal_snr=True).alphas_cumprod)
    assert path.t_max == 49 / 50
    assert torch.isfinite(path.log_snr(torch.tensor([1.0], dtype=T64))).all()


COEF_PARAMS = [
    EpsPrediction(),
    X0Prediction(),
    VelocityPrediction(),
    ScorePrediction(),
    EDMPreconditioning(0.5),
]


@pytest.mark.parametrize("param", COEF_PARAMS, ids=lambda p: p.name)
@pytest.mark.parametrize("path", _paths()[:4], ids=lambda p: type(p).__name__)
def test_parameterizations_round_trip(param, path):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(16, 3, generator=g, dtype=T64), torch.randn(16, 3, generator=g, dtype=T64)
    t = torch.linspace(0.05, 0.95, 16, dtype=T64)
    c = path.coefs(t, x0)
    x_t = c.alpha * x0 + c.sigma * eps
    out = param.from_x0_eps(x0, eps, c)
    x0_hat, eps_hat = param.x0_eps(out, x_t, c)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)
    torch.testing.assert_close(param.to_velocity(out, x_t, c), c.d_alpha * x0 + c.d_sigma * eps)
    torch.testing.assert_close(param.to_score(out, x_t, c), -eps / c.sigma)
    # eps_error_scale: a small error in eps at fixed x_t, seen in the parameterization's units
    d_eps = 1e-4 * torch.randn(16, 3, generator=g, dtype=T64)
    d_out = param.from_x0_eps((x_t - c.sigma * (eps + d_eps)) / c.alpha, eps + d_eps, c) - out
    ratio = (d_out**2).sum(1, keepdim=True) / (d_eps**2).sum(1, keepdim=True)
    torch.testing.assert_close(ratio, param.eps_error_scale(c).expand_as(ratio), rtol=1e-5, atol=0)


def test_v_prediction_round_trip_on_vp_paths():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 2, generator=g, dtype=T64), torch.randn(8, 2, generator=g, dtype=T64)
    for path in (GVPPath(), VPSDEPath()):
        c = path.coefs(torch.linspace(0.1, 0.9, 8, dtype=T64), x0)
        x_t = c.alpha * x0 + c.sigma * eps
        x0_hat, eps_hat = VPrediction().x0_eps(VPrediction().from_x0_eps(x0, eps, c), x_t, c)
        torch.testing.assert_close(x0_hat, x0)
        torch.testing.assert_close(eps_hat, eps)


def test_velocity_needs_derivatives():
    d = GaussianDiffusion(make_schedule("linear", 10))
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="d alpha / dt"):
        VelocityPrediction().target(x, x, torch.tensor([1, 2]), d)
