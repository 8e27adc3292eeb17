"""Flow matching / interpolants (processes/flow.py), training-time densities and every sampler on the family.

The oracle is the exact field of Gaussian data x_0 ~ N(mu, s2 I) on a path x_t = a x_0 + s eps:

    E[x_0 | x_t] = mu + a s2 / (a^2 s2 + s^2) (x_t - a mu),   eps_hat = (x_t - a x0_hat) / s,

from which every prediction (velocity, noise, score) follows. Under it the probability-flow ODE started from
pure noise x_T at t = 1 ends at mu + sqrt(s2) x_T, and in the VE view started at x = sigma_0 x_T at
mu + (sigma_0 x_T - mu) sqrt(s2) / sqrt(s2 + sigma_0^2).
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.processes.diffusion import GaussianDiffusion
from diffusion_lab.processes.edm import EDMDiffusion
from diffusion_lab.processes.flow import FlowMatching
from diffusion_lab.processes.paths import GVPPath, LinearPath
from diffusion_lab.processes.schedules import make_schedule
from diffusion_lab.processes.time_sampling import LogitNormalTime, LogNormalSigmaTime, ModeTime, time_shift
from diffusion_lab.samplers import get_sampler, sample

MU, S2 = 0.3, 0.25
T64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def posterior(a, s, x):
    x0 = MU + a * S2 / (a * a * S2 + s * s) * (x - a * MU)
    return x0, (x - a * x0) / s


def oracle(d: FlowMatching):
    """model_fn(x_t, 1000 t, y) giving the exact field in d's prediction, written out per prediction."""

    def model_fn(x, tt, y=None):
        t = tt.to(T64) / d.time_scale
        c = d.gpath.coefs(t, x.to(T64))
        x0, eps = posterior(c.alpha, c.sigma, x.to(T64))
        out = {
            "velocity": c.d_alpha * x0 + c.d_sigma * eps,
            "noise": eps,
            "score": -eps / c.sigma,
            "x0": x0,
        }[d._options["prediction"]]
        return out.to(x.dtype)

    return model_fn


def discrete_oracle(d: GaussianDiffusion):
    """model_fn(x_t, step, y): the exact field of a discrete diffusion in its parameterization."""

    def model_fn(x, t, y=None):
        assert t.dtype == torch.long
        c = d.coefs(t, x)
        x0, eps = posterior(c.alpha, c.sigma, x)
        return d.parameterization.target(x0, eps, t, d)

    return model_fn


def edm_oracle(d: EDMDiffusion):
    """model_fn(c_in x, c_noise, y) -> F with c_skip x + c_out F the exact denoiser (EDM Eq. 7)."""
    p = d.precond

    def model_fn(x_in, c_noise, y=None):
        sigma = (4.0 * c_noise.to(T64)).exp().to(x_in.dtype).reshape(-1, *([1] * (x_in.ndim - 1)))
        x = x_in / p.c_in(sigma)
        D = MU + S2 / (S2 + sigma**2) * (x - MU)
        return (D - p.c_skip(sigma) * x) / p.c_out(sigma)

    return model_fn


# ------------------------------------------------------------------------------------ time densities


def test_logit_normal_histogram_matches_its_pdf():
    dens = LogitNormalTime(loc=0.5, scale=0.8)
    n = 200_000
    t = dens.sample(n, generator=torch.Generator().manual_seed(0)).to(T64)
    edges = torch.linspace(0.0, 1.0, 41, dtype=T64)
    counts = torch.histc(t, bins=40, min=0.0, max=1.0)
    # expected counts from the pdf (Simpson's rule on each bin)
    mids = 0.5 * (edges[1:] + edges[:-1])
    lo, hi = edges[:-1].clamp(min=1e-9), edges[1:].clamp(max=1 - 1e-9)
    p = (hi - lo) / 6 * (dens.pdf(lo) + 4 * dens.pdf(mids) + dens.pdf(hi))
    expected = n * p
    keep = expected > 5
    chi2 = float((((counts - expected) ** 2) / expected)[keep].sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 4 * math.sqrt(2 * dof), f"chi2 {chi2:.1f} for {dof} dof"
    assert abs(float(p.sum()) - 1.0) < 1e-3


def test_time_shift_is_monotone_fixes_ends_and_is_undone_by_its_inverse():
    t = torch.linspace(0, 1, 101, dtype=T64)
    for s in (0.3, 1.0, 3.0):
        u = time_shift(t, s)
        assert bool((u[1:] > u[:-1]).all())
        assert float(u[0]) == 0.0 and float(u[-1]) == 1.0
        torch.testing.assert_close(time_shift(u, 1.0 / s), t)
    assert bool((time_shift(t[1:-1], 3.0) > t[1:-1]).all())  # s > 1: towards noise
    with pytest.raises(ValueError, match="time shift must be > 0"):
        time_shift(t, 0.0)


def test_mode_and_lognormal_densities():
    g = torch.Generator().manual_seed(1)
    u = ModeTime(0.0).sample(50_000, generator=g)  # scale 0: uniform
    assert abs(float(u.mean()) - 0.5) < 0.01 and float(u.min()) >= 0 and float(u.max()) <= 1
    dens = LogNormalSigmaTime(LinearPath(), P_mean=-1.2, P_std=1.2)
    t = dens.sample(50_000, generator=g).to(T64)
    log_sigma = LinearPath().ve_sigma(t).log()
    assert abs(float(log_sigma.mean()) + 1.2) < 0.03 and abs(float(log_sigma.std()) - 1.2) < 0.03


# ----------------------------------------------------------------------------------------- losses

SIT_GRID = [(p, q) for p in ("linear", "gvp") for q in ("velocity", "noise", "score")]


@pytest.mark.parametrize("path,prediction", SIT_GRID)
def test_loss_at_the_exact_field_is_the_irreducible_loss(path, prediction):
    """MC loss at the exact field = E_t Var(P | x_t) = E_t s2 (p1 s - p2 a)^2 / (a^2 s2 + s^2)."""
    d = FlowMatching(path=path, prediction=prediction, time_density="uniform", t_eps=0.02, discrete_steps=10)
    d = d.double()
    g = torch.Generator().manual_seed(0)
    B = 200_000
    t = d.sample_timesteps(B, generator=g).to(T64)
    x0 = MU + math.sqrt(S2) * torch.randn(B, 1, generator=g, dtype=T64)
    eps = torch.randn(B, 1, generator=g, dtype=T64)
    loss = d.training_losses(oracle(d), x0, t=t, eps=eps)["loss"]
    c = d.gpath.coefs(t, t[:, None])
    a, s = c.alpha[:, 0], c.sigma[:, 0]
    p1, p2 = {
        "velocity": (c.d_alpha[:, 0], c.d_sigma[:, 0]),
        "noise": (0 * a, 1 + 0 * a),
        "score": (0 * a, -1 / s),
    }[prediction]
    analytic = S2 * (p1 * s - p2 * a) ** 2 / (a * a * S2 + s * s)
    if prediction == "score":  # SiT's score loss is in eps units: ||sigma s_hat + eps||^2
        analytic = analytic * s * s
    rel = float((loss.mean() - analytic.mean()).abs() / analytic.mean())
    se = float((loss - analytic).std() / math.sqrt(B) / analytic.mean())
    assert rel < 4 * se + 1e-3, f"loss {float(loss.mean()):.5f} vs analytic {float(analytic.mean()):.5f}"


def test_eps_weighting_turns_any_prediction_into_the_eps_loss():
    g = torch.Generator().manual_seed(2)
    x0, eps = (
        torch.randn(64, 1, 2, 2, generator=g, dtype=T64),
        torch.randn(64, 1, 2, 2, generator=g, dtype=T64),
    )
    err = 0.1 * torch.randn(64, 1, 2, 2, generator=g, dtype=T64)  # an error in eps units at fixed x_t
    t = torch.rand(64, generator=g, dtype=T64) * 0.9 + 0.05
    for pred in ("velocity", "score"):
        d = FlowMatching(path="gvp", prediction=pred, loss_weighting="eps", discrete_steps=10).double()

        def wrong(x, tt, y=None, d=d):
            c = d.gpath.coefs(tt.to(T64) / 1000, x)
            e = (x - c.alpha * x0) / c.sigma + err  # the true eps of this x_t, plus err
            return d.prediction.from_x0_eps((x - c.sigma * e) / c.alpha, e, c)

        loss = d.training_losses(wrong, x0, t=t, eps=eps)["loss"]
        torch.testing.assert_close(loss.double(), (err**2).flatten(1).mean(1), rtol=1e-5, atol=1e-8)


def test_bad_options_fail_in_one_line():
    with pytest.raises(ValueError, match="unknown prediction"):
        FlowMatching(prediction="flow")
    with pytest.raises(ValueError, match="unknown path"):
        FlowMatching(path="cosine")
    with pytest.raises(ValueError, match="unknown coupling"):
        FlowMatching(coupling="sinkhorn")
    with pytest.raises(ValueError, match="continuous times"):
        FlowMatching(discrete_steps=10).training_losses(oracle, torch.zeros(2, 1), t=torch.tensor([1, 2]))


# --------------------------------------------------------------------------------------- samplers

SAMPLERS = [
    ("ddpm", dict(steps=100)),
    ("ddim", dict(steps=50)),
    ("dpm_solver", dict(steps=25)),
    ("euler", dict(steps=60)),
    ("heun", dict(steps=25)),
    ("heun", dict(steps=25, S_churn=5.0)),
    ("euler_maruyama", dict(steps=150)),
]


@pytest.mark.parametrize("path,prediction", [("linear", "velocity"), ("gvp", "score")])
@pytest.mark.parametrize("name,kw", SAMPLERS, ids=lambda v: str(v))
def test_every_sampler_returns_the_data_moments(path, prediction, name, kw):
    d = FlowMatching(path=path, prediction=prediction, discrete_steps=200)
    x = sample(oracle(d), d, (4000, 1, 1, 2), sampler=name, seed=0, clip_denoised=False, **kw).double()
    assert abs(float(x.mean()) - MU) < 0.03, float(x.mean())
    assert abs(float(x.var()) - S2) < 0.03, float(x.var())
    cov = torch.cov(x.flatten(1).T)
    assert abs(float(cov[0, 1])) < 0.03  # diagonal Sigma


@pytest.mark.parametrize(
    "name,grid,steps,low,high",
    [
        ("euler", "karras", (16, 32), 1.6, 2.6),  # order 1: error halves
        ("ddim", "uniform", (16, 32), 1.6, 2.6),
        ("heun", "karras", (16, 32), 3.0, 8.0),  # order 2: error / 4
        ("dpm_solver", "uniform", (20, 40), 3.0, 8.0),
    ],
)
def test_error_shrinks_at_the_solver_order(name, grid, steps, low, high):
    d = FlowMatching(path="linear", prediction="velocity", discrete_steps=1000).double()
    x_T = torch.randn(256, 1, 1, 2, generator=torch.Generator().manual_seed(0), dtype=T64)
    if name in ("euler", "heun"):  # VE view from sigma_0 = 80
        exact = MU + (80.0 * x_T - MU) * math.sqrt(S2) / math.sqrt(S2 + 80.0**2)
    else:  # from pure noise at t = 1
        exact = MU + math.sqrt(S2) * x_T
    errs = [
        float(
            (get_sampler(name)(oracle(d), d, x_T, steps=n, grid=grid, clip_denoised=False) - exact)
            .abs()
            .max()
        )
        for n in steps
    ]
    assert low < errs[0] / errs[1] < high, errs


def test_euler_maruyama_runs_on_every_family_and_refuses_infinite_coefficients():
    disc = GaussianDiffusion(make_schedule("cosine", 200), parameterization="v")
    edm = EDMDiffusion(discrete_steps=50)
    # the reverse VE SDE on EDM's path (w = sigma d_sigma); SiT's w = sigma on the VP-like discrete path
    for d, model, form in ((disc, discrete_oracle(disc), "sigma"), (edm, edm_oracle(edm), "sbdm")):
        x = sample(
            model,
            d,
            (3000, 1, 1, 2),
            sampler="euler_maruyama",
            steps=150,
            diffusion_form=form,
            clip_denoised=False,
        )
        assert abs(float(x.mean()) - MU) < 0.04 and abs(float(x.var()) - S2) < 0.04, (type(d), x.var())
    f = FlowMatching(discrete_steps=10)
    with pytest.raises(ValueError, match="infinite at t_start"):
        sample(oracle(f), f, (4, 1, 1, 2), sampler="euler_maruyama", steps=5, diffusion_form="sbdm")
    x = sample(
        oracle(f),
        f,
        (4000, 1, 1, 2),
        sampler="euler_maruyama",
        steps=150,
        diffusion_form="sbdm",
        t_start=0.99,
        clip_denoised=False,
    )
    assert abs(float(x.mean()) - MU) < 0.04 and abs(float(x.var()) - S2) < 0.04


def test_velocity_contract_on_every_family():
    """velocity(model, x, t) is the exact field's drift d_alpha x0_hat + d_sigma eps_hat for each family."""
    disc = GaussianDiffusion(make_schedule("linear", 100))
    edm = EDMDiffusion(discrete_steps=50)
    flow = FlowMatching(path="gvp", prediction="score", discrete_steps=10)
    models = (discrete_oracle(disc), edm_oracle(edm), oracle(flow))
    t = torch.tensor([0.2, 0.5, 0.8])  # knots of the 100-step schedule
    x = torch.randn(3, 1, 1, 2, generator=torch.Generator().manual_seed(4))
    for d, model in zip((disc, edm, flow), models, strict=True):
        c = d.path().coefs(t.double(), x.double())
        x0, eps = posterior(c.alpha, c.sigma, x.double())
        want = c.d_alpha * x0 + c.d_sigma * eps
        torch.testing.assert_close(d.velocity(model, x, t).double(), want, rtol=2e-4, atol=2e-4)


def test_flow_checkpoint_state_and_respace_keep_the_objective():
    d = FlowMatching(path="gvp", prediction="noise", time_density="mode", discrete_steps=100)
    r = d.respace([0, 10, 50, 99])
    assert isinstance(r, FlowMatching) and r.num_timesteps == 4 and r._options == d._options
    torch.testing.assert_close(r.times64, d.times64[[0, 10, 50, 99]])
    assert isinstance(d.path(), GVPPath)
