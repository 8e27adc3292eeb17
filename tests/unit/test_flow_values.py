"""The flow / interpolant objectives by value: SiT's defaults, every loss weighting against its definition,
the ODE interval and the likelihood of noise-, score- and x0-predicting models, the GVP path in float32, and
the time densities (SD3's mode density, the shift) against their formulas.

The paths, posteriors and weightings are written out here from the papers, independently of the modules:

    linear  alpha = 1 - t, sigma = t                      GVP  alpha = cos(pi t / 2), sigma = sin(pi t / 2)
    Gaussian data N(0, s2 I): E[x0 | x_t] = a s2 / (a^2 s2 + s^2) x_t,  E[eps | x_t] = s / (a^2 s2 + s^2) x_t
    marginal of x_t: N(0, (a^2 s2 + s^2) I)
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.processes.flow import FlowMatching
from diffusion_lab.processes.likelihood_ode import bpd_offset, dequantize, model_bpd_ode
from diffusion_lab.processes.paths import GVPPath, LinearPath, VEPath, VPSDEPath
from diffusion_lab.processes.time_sampling import LogitNormalTime, ModeTime, UniformTime
from diffusion_lab.processes.weighting import kingma_gao_weight

T64 = torch.float64
S2 = 0.3  # the data variance


def coefs(path: str, t: torch.Tensor):
    """(a, s, a', s') of the path at t, written out."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    h = 0.5 * math.pi
    return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)


def encode(prediction: str, x0, eps, a, s, da, ds):
    """What a network of each prediction outputs for the pair (x0, eps) (SiT, Lipman et al., Ho et al.)."""
    return {
        "velocity": da * x0 + ds * eps,
        "noise": eps,
        "score": -eps / s,
        "x0": x0,
    }[prediction]


def ideal_network(path: str, prediction: str, time_scale: float = 1000.0):
    """The exact network for data N(0, S2 I): the posterior means of x0 and eps, in the prediction's units."""

    def net(x, tt, y=None):
        t = (tt.to(T64) / time_scale).reshape(-1, *([1] * (x.ndim - 1)))
        a, s, da, ds = coefs(path, t)
        v = a * a * S2 + s * s
        x0, eps = a * S2 / v * x.to(T64), s / v * x.to(T64)
        return encode(prediction, x0, eps, a, s, da, ds).to(x.dtype)

    return net


# ------------------------------------------------------------------------------------ SiT's defaults


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_sit_defaults_follow_the_prediction(path):
    """willisma/SiT create_transport: train_eps = sample_eps = 1e-3 for noise and score, 0 for velocity."""
    for prediction, eps in (("velocity", 0.0), ("noise", 1e-3), ("score", 1e-3), ("x0", 1e-3)):
        d = FlowMatching(path=path, prediction=prediction, discrete_steps=10)
        assert (d.t_eps, d.sample_eps) == (eps, eps)
        assert d.ode_interval() == (eps, 1.0 - eps)
        assert d.t_top == 1.0 - eps  # every sampler starts where the ODE is defined
        t = d.sample_timesteps(100_000, generator=torch.Generator().manual_seed(0))
        assert float(t.min()) >= eps and float(t.max()) <= 1.0 - eps
    assert FlowMatching(prediction="score").weighting == "eps"
    assert FlowMatching(prediction="noise").weighting == "none"
    assert FlowMatching(prediction="score", t_eps=0.01, sample_eps=0.02).ode_interval() == (0.02, 0.98)


def test_sit_interval_on_the_other_paths():
    assert FlowMatching(path="vp_sde", prediction="velocity").ode_interval() == (1e-3, 1.0 - 1e-3)
    assert FlowMatching(path="vp_sde", prediction="velocity").t_lo == 1e-5
    assert FlowMatching(path="ve", prediction="noise").ode_interval() == (0.0, 1.0)


def test_uniform_training_times_fill_the_interval_uniformly():
    """SiT draws t = t0 + (t1 - t0) u: no point mass at the ends (a clamp puts 1e-3 of the draws there)."""
    d = FlowMatching(path="linear", prediction="noise", time_density="uniform")
    t = d.sample_timesteps(400_000, generator=torch.Generator().manual_seed(1)).to(T64)
    assert float(((t - 1e-3).abs() < 1e-6).to(T64).mean()) < 1e-4  # uniform: 1e-6 of the draws
    assert float(((t - (1 - 1e-3)).abs() < 1e-6).to(T64).mean()) < 1e-4
    for q in (0.1, 0.5, 0.9):
        assert abs(float(t.quantile(q)) - (1e-3 + (1 - 2e-3) * q)) < 3e-3


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_sit_score_loss_is_in_eps_units(path):
    """SiT's score loss ||sigma s_hat + eps||^2 (weight None); ``none`` keeps ||s_hat - s||^2."""
    g = torch.Generator().manual_seed(2)
    B = 256
    x0, eps = torch.randn(B, 1, 2, 2, generator=g, dtype=T64), torch.randn(B, 1, 2, 2, generator=g, dtype=T64)
    t = torch.rand(B, generator=g, dtype=T64) * 0.998 + 1e-3
    out = torch.randn(B, 1, 2, 2, generator=g, dtype=T64)
    _, s, _, _ = coefs(path, t.reshape(-1, 1, 1, 1))
    sit = ((s * out + eps) ** 2).flatten(1).mean(1)
    raw = ((out + eps / s) ** 2).flatten(1).mean(1)
    net = lambda x, tt, y=None: out  # noqa: E731
    default = FlowMatching(path=path, prediction="score").double()
    none = FlowMatching(path=path, prediction="score", loss_weighting="none").double()
    loss_default = default.training_losses(net, x0, t=t, eps=eps)["loss"].double()
    loss_none = none.training_losses(net, x0, t=t, eps=eps)["loss"].double()
    torch.testing.assert_close(loss_default, sit, rtol=2e-5, atol=1e-9)  # the MSE is taken in float32
    torch.testing.assert_close(loss_none, raw, rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_default_score_and_noise_losses_agree_at_the_exact_field(path):
    """Both are eps-unit losses: at the ideal network they equal E Var(eps | x_t) = a^2 s2 / (a^2 s2 + s^2),
    and no draw near t = 0 dominates (the score-unit loss would be 1 / s^2 times larger there)."""
    g = torch.Generator().manual_seed(3)
    B = 200_000
    x0 = math.sqrt(S2) * torch.randn(B, 1, generator=g, dtype=T64)
    eps = torch.randn(B, 1, generator=g, dtype=T64)
    losses = {}
    for prediction in ("noise", "score"):
        d = FlowMatching(path=path, prediction=prediction, time_density="uniform").double()
        t = d.sample_timesteps(B, generator=torch.Generator().manual_seed(4)).to(T64)
        losses[prediction] = d.training_losses(ideal_network(path, prediction), x0, t=t, eps=eps)["loss"]
    torch.testing.assert_close(losses["score"].double(), losses["noise"].double(), rtol=2e-5, atol=1e-7)
    a, s, _, _ = coefs(path, t)
    analytic = a * a * S2 / (a * a * S2 + s * s)
    se = float((losses["score"].double() - analytic).std()) / math.sqrt(B)
    assert abs(float(losses["score"].double().mean() - analytic.mean())) < 4 * se
    near = t < 0.01  # 1% of the draws
    eps_units, score_units = losses["score"].double(), losses["score"].double() / (s * s)
    assert float(eps_units[near].sum() / eps_units.sum()) < 0.05
    assert float(score_units[near].sum() / score_units.sum()) > 0.5  # what loss_weighting=none trains


# -------------------------------------------------------------------------- every weighting by value

PREDICTIONS = ("velocity", "noise", "score", "x0")
WEIGHTINGS = ("none", "eps", "x0", "velocity", "score", "likelihood", "min_snr")


@pytest.mark.parametrize("path", ["linear", "gvp"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_every_weighting_measures_the_loss_in_its_units(path, prediction):
    """A network whose (x0_hat, eps_hat) is consistent with x_t (a x0_hat + s eps_hat = x_t) has, in each
    weighting's units, the error written out below; the weighted loss must equal it."""
    g = torch.Generator().manual_seed(5)
    B, gamma = 64, 5.0
    x0, eps = torch.randn(B, 1, 2, 2, generator=g, dtype=T64), torch.randn(B, 1, 2, 2, generator=g, dtype=T64)
    t = torch.rand(B, generator=g, dtype=T64) * 0.9 + 0.05
    a, s, da, ds = coefs(path, t.reshape(-1, 1, 1, 1))
    x_t = a * x0 + s * eps
    x0_hat = x0 + 0.1 * torch.randn(B, 1, 2, 2, generator=g, dtype=T64)
    eps_hat = (x_t - a * x0_hat) / s
    out = encode(prediction, x0_hat, eps_hat, a, s, da, ds)
    target = encode(prediction, x0, eps, a, s, da, ds)

    def per(err):
        return err.flatten(1).mean(1)

    ex0, eeps = per((x0_hat - x0) ** 2), per((eps_hat - eps) ** 2)
    expected = {
        "none": per((out - target) ** 2),
        "eps": eeps,
        "x0": ex0,
        "velocity": per((da * (x0_hat - x0) + ds * (eps_hat - eps)) ** 2),
        "score": eeps / s.flatten() ** 2,
        "likelihood": (ds / s - da / a).flatten() * eeps,  # -(1/2) d lambda / dt (VDM Eq. 17)
        "min_snr": torch.clamp((a / s).flatten() ** 2, max=gamma) * ex0,
    }
    for name in WEIGHTINGS:
        d = FlowMatching(path=path, prediction=prediction, loss_weighting=name, min_snr_gamma=gamma).double()
        loss = d.training_losses(lambda x, tt, y=None: out, x0, t=t, eps=eps)["loss"].double()
        torch.testing.assert_close(loss, expected[name], rtol=2e-5, atol=1e-9, msg=f"{name}")


def test_kingma_gao_weight_is_finite_to_the_ends_and_matches_the_closed_form():
    """Uniform t, velocity, w = 1: w_KG = p / |d lambda / dt| c_P, = t / (2 (1 - t)) on the linear path
    (|d lambda / dt| = 2 / (t (1 - t)), c_P = 1 / (1 - t)^2) and pi tan(pi t / 2) / 4 on GVP."""
    from diffusion_lab.processes.parameterization import VelocityPrediction

    t = torch.tensor([1e-7, 1e-5, 0.3, 0.5, 0.9, 1 - 1e-5, 1 - 1e-7], dtype=T64)
    ones = torch.ones_like(t)
    lin = kingma_gao_weight(LinearPath(), ones, t, VelocityPrediction(), ones)
    torch.testing.assert_close(lin, t / (2 * (1 - t)), rtol=1e-9, atol=0)
    gvp = kingma_gao_weight(GVPPath(), ones, t, VelocityPrediction(), ones)
    torch.testing.assert_close(gvp, math.pi * torch.tan(0.5 * math.pi * t) / 4, rtol=1e-7, atol=0)


@pytest.mark.parametrize("path", [LinearPath(), GVPPath(), VPSDEPath(), VEPath()], ids=lambda p: p.name)
def test_d_log_snr_is_the_derivative_of_log_snr(path):
    t = torch.linspace(0.02, 0.98, 25, dtype=T64)
    h = 1e-6
    fd = (path.log_snr(t + h) - path.log_snr(t - h)) / (2 * h)
    torch.testing.assert_close(path.d_log_snr(t), fd, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------- GVP in float32


def test_gvp_is_exact_at_both_ends_in_float32():
    p = GVPPath()
    ends = torch.tensor([0.0, 1.0])
    assert p.alpha(ends).tolist() == [1.0, 0.0] and p.sigma(ends).tolist() == [0.0, 1.0]
    assert p.log_snr(ends).tolist() == [math.inf, -math.inf]
    assert p.ve_sigma(ends).tolist() == [0.0, math.inf]
    t = torch.linspace(0, 1, 100_001)
    assert bool((p.alpha(t) >= 0).all() and (p.sigma(t) >= 0).all())
    t64 = t.to(T64)
    torch.testing.assert_close(p.alpha(t).to(T64), torch.cos(0.5 * math.pi * t64), rtol=0, atol=2e-7)
    torch.testing.assert_close(p.sigma(t).to(T64), torch.sin(0.5 * math.pi * t64), rtol=0, atol=2e-7)
    inner = t[1:-1]
    assert bool(torch.isfinite(p.log_snr(inner)).all() and (p.ve_sigma(inner) > 0).all())
    lam64 = -2 * torch.log(torch.tan(0.5 * math.pi * inner.to(T64)))
    torch.testing.assert_close(p.log_snr(inner).to(T64), lam64, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- the ODE likelihood of every prediction


def _expected_bpd(x: torch.Tensor, t0: float, path: str) -> torch.Tensor:
    """-log N(x; 0, (S2 + (s0 / a0)^2) I) in bits/dim + the offset: the data blurred to the ODE's start."""
    a0, s0, _, _ = coefs(path, torch.tensor(t0, dtype=T64))
    var = S2 + float(s0 / a0) ** 2
    x = x.to(T64).flatten(1)
    nll = 0.5 * (x**2).sum(1) / var + 0.5 * x.shape[1] * math.log(2 * math.pi * var)
    return nll / (x.shape[1] * math.log(2)) + bpd_offset()


@pytest.mark.parametrize("path", ["linear", "gvp"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_bpd_ode_of_the_exact_field_in_every_prediction(path, prediction):
    """Over the objective's ODE interval, with its conversions to the velocity, the ideal network's
    bits/dim equal the closed form (float64, tight tolerances); over [0, 1] the noise, score and x0 models
    divide by zero."""
    d = FlowMatching(path=path, prediction=prediction, discrete_steps=10).double()
    images = torch.randint(0, 256, (5, 1, 2, 2), generator=torch.Generator().manual_seed(6)).to(torch.uint8)
    bpd, _ = model_bpd_ode(
        d,
        ideal_network(path, prediction),
        images,
        generator=torch.Generator().manual_seed(0),
        dtype=T64,
        divergence="exact",
        rtol=1e-8,
        atol=1e-8,
    )
    x = dequantize(images, generator=torch.Generator().manual_seed(0), dtype=T64)
    t0, _ = d.ode_interval()
    torch.testing.assert_close(bpd, _expected_bpd(x, t0, path), rtol=0, atol=2e-6)


def test_bpd_ode_in_float32_with_heun_is_close_to_the_closed_form():
    """The validation setting (float32, Heun on a fixed grid) for a noise-predicting linear model: a few
    hundredths of a bit from the closed form (it was NaN over [0, 1])."""
    d = FlowMatching(path="linear", prediction="noise", discrete_steps=10)
    images = torch.randint(0, 256, (8, 1, 4, 4), generator=torch.Generator().manual_seed(7)).to(torch.uint8)
    bpd, nfe = model_bpd_ode(
        d,
        ideal_network("linear", "noise"),
        images,
        generator=torch.Generator().manual_seed(0),
        steps=32,
        method="heun",
    )
    x = dequantize(images, generator=torch.Generator().manual_seed(0))
    assert nfe == 64
    torch.testing.assert_close(bpd.to(T64), _expected_bpd(x, 1e-3, "linear"), rtol=0, atol=0.02)


def test_a_solve_through_a_singular_end_fails_in_one_line():
    d = FlowMatching(path="linear", prediction="noise", sample_eps=0.0, discrete_steps=10).double()
    images = torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="alpha = 0|not finite|ode_interval") as e:
        model_bpd_ode(d, ideal_network("linear", "noise"), images, dtype=T64, steps=4, method="heun")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ time densities


def test_shifted_pdf_is_the_change_of_variables():
    """SD3's shift t' = s t / (1 + (s - 1) t): for uniform t, p(t') = r / (1 + (r - 1) t')^2, r = 1 / s."""
    t = torch.linspace(1e-4, 1 - 1e-4, 999, dtype=T64)
    for s in (0.5, 3.0):
        r = 1 / s
        torch.testing.assert_close(UniformTime(shift=s).pdf(t), r / (1 + (r - 1) * t) ** 2)
    dens = LogitNormalTime(0.3, 0.8, shift=3.0)
    grid = torch.linspace(1e-6, 1 - 1e-6, 400_001, dtype=T64)
    assert abs(float(torch.trapezoid(dens.pdf(grid), grid)) - 1) < 1e-4
    draws = dens.sample(200_000, generator=torch.Generator().manual_seed(8)).to(T64)
    for lo, hi in ((0.1, 0.3), (0.5, 0.7), (0.8, 0.95)):
        inside = torch.linspace(lo, hi, 2001, dtype=T64)
        mass = float(torch.trapezoid(dens.pdf(inside), inside))
        share = float(((draws > lo) & (draws < hi)).to(T64).mean())
        assert abs(share - mass) < 4 * math.sqrt(mass * (1 - mass) / len(draws)) + 1e-4, (lo, hi)


def test_sd3_mode_density_at_its_default_scale():
    """SD3 Eq. 20 at c = 1.29: t = f(u) = 1 - u - c (cos^2(pi u / 2) - 1 + u) is decreasing from 1 to 0, so
    the q-quantile of t is f(1 - q) and the density is 1 / |f'(u)| at u = f^-1(t)."""
    c = 1.29

    def f(u):
        return 1 - u - c * (torch.cos(0.5 * math.pi * u) ** 2 - 1 + u)

    dens = ModeTime(c)
    draws = dens.sample(400_000, generator=torch.Generator().manual_seed(9)).to(T64)
    assert float(draws.min()) >= 0 and float(draws.max()) <= 1
    q = torch.tensor([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99], dtype=T64)
    torch.testing.assert_close(draws.quantile(q), f(1 - q), rtol=0, atol=4e-3)
    u = torch.linspace(0.01, 0.99, 50, dtype=T64)
    slope = -1 - c * (1 - 0.5 * math.pi * torch.sin(math.pi * u))  # f'(u)
    torch.testing.assert_close(dens.pdf(f(u)), 1 / slope.abs(), rtol=1e-8, atol=0)
    grid = torch.linspace(0, 1, 200_001, dtype=T64)
    assert abs(float(torch.trapezoid(dens.pdf(grid), grid)) - 1) < 1e-4
