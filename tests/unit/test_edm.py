"""The continuous-time family: EDM preconditioning and loss (Karras et al. 2022, Table 1), Euler / Heun
(Algorithms 1 and 2), and the bridges between the discrete and the continuous families.

The oracle is the exact denoiser of Gaussian data x_0 ~ N(mu, s^2 I):

    D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)

under which the probability-flow ODE dx / dsigma = (x - D) / sigma has the solution
x(sigma) - mu ∝ sqrt(s^2 + sigma^2), so a sampler started at x = sigma_max z must return

    x_0 = mu + s / sqrt(s^2 + sigma_max^2) (sigma_max z - mu).
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.processes.diffusion import GaussianDiffusion
from diffusion_lab.processes.edm import EDMDiffusion
from diffusion_lab.processes.parameterization import EDMPreconditioning
from diffusion_lab.processes.schedules import make_schedule
from diffusion_lab.samplers import NFECounter, ddim_sample, ddpm_sample, dpm_solver_sample, sample
from diffusion_lab.samplers.edm import churn_gamma, euler_sample, heun_sample, sigma_denoiser
from diffusion_lab.samplers.timesteps import make_grid
from diffusion_lab.samplers.timesteps import sigmas as discrete_sigmas

MU, S = 0.3, 0.5
SIGMAS = [0.002, 0.02, 0.2, 0.5, 2.0, 20.0, 80.0]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def edm_oracle(d: EDMDiffusion, mu: float = MU, s: float = S):
    """model_fn(c_in x, c_noise, y) -> F such that c_skip x + c_out F is the exact denoiser of N(mu, s^2)."""
    p = d.precond

    def model_fn(x_in, c_noise, y=None):
        assert c_noise.is_floating_point() and c_noise.shape == (x_in.shape[0],)
        sigma = (4.0 * c_noise.to(torch.float64)).exp().to(x_in.dtype).reshape(-1, 1, 1, 1)
        x = x_in / p.c_in(sigma)
        D = mu + s**2 / (s**2 + sigma**2) * (x - mu)
        return (D - p.c_skip(sigma) * x) / p.c_out(sigma)

    return model_fn


def discrete_oracle(d: GaussianDiffusion, mu: float = MU, s: float = S):
    """model_fn(x_t, t, y) giving the exact E[x_0 | x_t] in d's parameterization (eps / x0 / v)."""

    def model_fn(x_t, t, y=None):
        assert t.dtype == torch.long
        a = d.coef("sqrt_alphas_cumprod", t, x_t)
        var = 1.0 - d.coef("alphas_cumprod", t, x_t)
        x0 = mu + a * s**2 / (a**2 * s**2 + var) * (x_t - a * mu)
        return d.parameterization.target(x0, d.eps_from_x0(x_t, t, x0), t, d)

    return model_fn


def exact_solution(x_T: torch.Tensor, sigma_max: float, mu: float = MU, s: float = S) -> torch.Tensor:
    return mu + s / math.sqrt(s**2 + sigma_max**2) * (sigma_max * x_T - mu)


# ---------------------------------------------------------------------------------- preconditioning


@pytest.mark.parametrize("sigma_data", [0.5, 0.3])
def test_preconditioning_matches_table_1(sigma_data):
    p = EDMPreconditioning(sigma_data)
    sd = sigma_data
    for sigma in SIGMAS:
        s = torch.tensor(sigma, dtype=torch.float64)
        assert p.c_skip(s).item() == pytest.approx(sd**2 / (sigma**2 + sd**2), rel=1e-12)
        assert p.c_out(s).item() == pytest.approx(sigma * sd / math.sqrt(sd**2 + sigma**2), rel=1e-12)
        assert p.c_in(s).item() == pytest.approx(1.0 / math.sqrt(sigma**2 + sd**2), rel=1e-12)
        assert p.c_noise(s).item() == pytest.approx(math.log(sigma) / 4.0, rel=1e-12)
        lam = (sigma**2 + sd**2) / (sigma * sd) ** 2
        assert p.loss_weight(s).item() == pytest.approx(lam, rel=1e-12)
        # EDM Sec. 5 / Eq. 8: lambda(sigma) c_out(sigma)^2 = 1, a unit effective weight at every sigma
        assert (p.loss_weight(s) * p.c_out(s) ** 2).item() == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPreconditioning(0.0)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_network_input_and_training_target_have_unit_variance(sigma):
    """EDM App. B.6: c_in and c_out are chosen so that, for data of std sigma_data, the network's input and
    its effective target (x_0 - c_skip x) / c_out both have unit variance at every sigma."""
    sd = 0.5
    p = EDMPreconditioning(sd)
    g = torch.Generator().manual_seed(0)
    n_samples = 200_000
    # non-Gaussian data of std sigma_data: a two-point mixture +-sd, and uniform on [-sqrt(3) sd, sqrt(3) sd]
    for x0 in (
        sd * (2.0 * torch.randint(0, 2, (n_samples,), generator=g, dtype=torch.float64) - 1.0),
        sd * math.sqrt(3.0) * (2.0 * torch.rand(n_samples, generator=g, dtype=torch.float64) - 1.0),
    ):
        n = torch.randn(n_samples, generator=g, dtype=torch.float64)
        s = torch.tensor(sigma, dtype=torch.float64)
        net_in = p.c_in(s) * (x0 + s * n)
        target = p.network_target(x0, n, s)
        torch.testing.assert_close(target, (x0 - p.c_skip(s) * (x0 + s * n)) / p.c_out(s))
        # 200k samples: the standard error of a variance of ~1 is <= sqrt(2 / N) ~ 0.003
        assert net_in.var().item() == pytest.approx(1.0, abs=0.015)
        assert target.var().item() == pytest.approx(1.0, abs=0.015)


def test_denoiser_round_trip_through_the_discrete_interface():
    """to_x0_eps of the discrete view inverts target: the network predicting the target gives x_0 and eps."""
    d = EDMDiffusion(discrete_steps=50)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(50, 1, 4, 4, generator=g)
    eps = torch.randn(50, 1, 4, 4, generator=g)
    t = torch.arange(50)
    x_t = d.q_sample(x0, t, eps)
    x0_hat, eps_hat = d.parameterization.to_x0_eps(d.parameterization.target(x0, eps, t, d), x_t, t, d)
    torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ training


def test_training_noise_levels_are_log_normal():
    d = EDMDiffusion(P_mean=-1.2, P_std=1.2)
    s = d.sample_timesteps(100_000, generator=torch.Generator().manual_seed(0))
    assert s.dtype == torch.float32 and (s > 0).all()
    assert s.log().mean().item() == pytest.approx(-1.2, abs=0.02)  # standard error 0.004
    assert s.log().std().item() == pytest.approx(1.2, abs=0.02)
    again = d.sample_timesteps(100_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, again)


def test_loss_is_lambda_weighted_denoising_error():
    """loss = lambda(sigma) ||D - x_0||^2 (EDM Eq. 2, Table 1) = ||F - (x_0 - c_skip x) / c_out||^2 (Eq. 8)"""
    d = EDMDiffusion(sigma_data=0.5)
    g = torch.Generator().manual_seed(0)
    B = 7
    x0 = torch.rand(B, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(B, 1, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    weight = torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64)

    def net(x_in, c_noise, y=None):  # any network: here a fixed affine map of its inputs
        return 0.3 * x_in + weight * c_noise.reshape(-1, 1, 1, 1)

    terms = d.training_losses(net, x0, t=sigma, eps=eps)
    sd, s4 = 0.5, sigma.reshape(-1, 1, 1, 1)
    x = x0 + s4 * eps
    F = net(x / (s4**2 + sd**2).sqrt(), sigma.log() / 4)
    D = sd**2 / (s4**2 + sd**2) * x + s4 * sd / (s4**2 + sd**2).sqrt() * F
    lam = (sigma**2 + sd**2) / (sigma * sd) ** 2
    torch.testing.assert_close(terms["mse"].double(), ((D - x0) ** 2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=0)
    torch.testing.assert_close(terms["loss"].double(), lam * terms["mse"].double(), rtol=1e-6, atol=0)
    target = d.precond.network_target(x0, eps, s4)
    torch.testing.assert_close(
        terms["loss"].double(), ((F - target) ** 2).mean(dim=(1, 2, 3)), rtol=1e-4, atol=0
    )
    with pytest.raises(ValueError, match="sigma"):
        d.training_losses(net, x0, t=torch.zeros(B, dtype=torch.long), eps=eps)


@pytest.mark.parametrize("model", ["unet", "mlp"])
def test_every_backbone_trains_on_continuous_noise_levels(model):
    """The backbone sees c_in x and the float c_noise = ln(sigma) / 4; gradients reach every layer."""
    from diffusion_lab.models import MLP, UNet

    torch.manual_seed(0)
    if model == "unet":
        net = UNet(
            in_channels=1,
            out_channels=1,
            image_size=8,
            channels=16,
            channel_mult=[1, 2],
            num_res_blocks=1,
            attention_resolutions=[4],
        )
    else:
        net = MLP(in_channels=1, out_channels=1, image_size=8, hidden_dim=32, num_layers=1)
    d = EDMDiffusion()
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    sigma = d.sample_timesteps(4, generator=torch.Generator().manual_seed(0))
    loss = d.training_losses(net, x0, t=sigma)["loss"].mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in net.parameters())
    # the time embedding changes the output: c_noise is used, not truncated to an integer step
    with torch.no_grad():  # random weights everywhere (the residual branches start at zero)
        for p in net.parameters():
            p.normal_(0.0, 0.1)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a = net(x, torch.tensor([0.10, 0.10]))
        b = net(x, torch.tensor([0.10, 0.35]))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_bits_per_dim_is_refused_clearly():
    d = EDMDiffusion(discrete_steps=10)
    x0 = torch.zeros(2, 1, 4, 4)
    for fn in (d.bpd_estimate, d.bpd_bound):
        with pytest.raises(ValueError, match="bits/dim .* objective=edm"):
            fn(lambda x, t, y=None: x, x0)
    assert not d.has_likelihood


# -------------------------------------------------------------------------- Euler / Heun on EDM models


def test_heun_is_second_order_and_euler_first_order():
    """Error against the exact ODE solution: log-error vs log-steps slope -2 (Heun), -1 (Euler)."""
    d = EDMDiffusion()
    x_T = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).reshape(11, 1, 1, 1)
    exact = exact_solution(x_T, d.sigma_max)
    steps = [16, 32, 64, 128]

    def slope(fn):
        errs = [(fn(edm_oracle(d), d, x_T, n, clip_denoised=False) - exact).abs().max().item() for n in steps]
        logn = torch.tensor(steps, dtype=torch.float64).log()
        loge = torch.tensor(errs, dtype=torch.float64).log()
        dn = logn - logn.mean()
        return (dn * (loge - loge.mean())).sum().item() / (dn**2).sum().item()  # least-squares slope

    heun, euler = slope(heun_sample), slope(euler_sample)
    assert -2.3 < heun < -1.8, heun  # observed -2.07
    assert -1.2 < euler < -0.85, euler  # observed -0.99
    x = heun_sample(edm_oracle(d), d, x_T, 256, clip_denoised=False)
    assert (x - exact).abs().max().item() < 1e-3  # observed 3.3e-4


def test_nfe_callback_and_karras_grid():
    d = EDMDiffusion()
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for fn, nfe in ((heun_sample, 35), (euler_sample, 18)):  # EDM: 18 steps of Heun = 35 NFE
        calls: list[tuple] = []
        record = calls.append
        _, n = sample(
            edm_oracle(d),
            d,
            (2, 1, 4, 4),
            sampler=fn,
            steps=18,
            return_nfe=True,
            callback=lambda i, t, x_t, x0, record=record: record((i, t, x_t.shape, x0.shape)),
        )
        assert n == nfe and [c[0] for c in calls] == list(range(18))
        ts = [c[1] for c in calls]
        assert ts[0] == d.num_timesteps - 1 and ts == sorted(ts, reverse=True)  # nearest discrete step
    D = sigma_denoiser(edm_oracle(d), d)
    grid = D.grid(18, "karras", {})
    assert len(grid) == 18 and grid[0] == pytest.approx(80.0) and grid[-1] == pytest.approx(0.002)
    assert all(a > b for a, b in zip(grid, grid[1:]))
    linear = D.grid(5, "karras", {"rho": 1.0, "sigma_min": 1.0, "sigma_max": 5.0})
    assert linear == pytest.approx([5.0, 4.0, 3.0, 2.0, 1.0])  # rho = 1: evenly spaced sigmas
    # any other grid picks sigmas of the discrete view
    uniform = D.grid(5, "uniform", {})
    assert uniform[0] == pytest.approx(80.0, rel=1e-6) and uniform[-1] == pytest.approx(0.002, rel=1e-6)
    with pytest.raises(ValueError, match="unknown options"):
        D.grid(5, "karras", {"steps_offset": 1})
    x = heun_sample(edm_oracle(d), d, x_T, 32, grid_opts={"sigma_max": 10.0}, clip_denoised=False)
    torch.testing.assert_close(x, exact_solution(x_T, 10.0), atol=0.03, rtol=0)  # observed 0.014


def test_churn_gamma_and_stochastic_heun():
    # EDM Algorithm 2: gamma = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax], else 0
    assert churn_gamma(1.0, 10, 2.0, 0.05, 50.0) == pytest.approx(0.2)
    assert churn_gamma(1.0, 10, 40.0, 0.05, 50.0) == pytest.approx(math.sqrt(2) - 1)
    assert churn_gamma(60.0, 10, 40.0, 0.05, 50.0) == 0.0
    assert churn_gamma(0.01, 10, 40.0, 0.05, 50.0) == 0.0
    assert churn_gamma(1.0, 10, 0.0, 0.0, math.inf) == 0.0

    d = EDMDiffusion()
    x_T = torch.randn(4096, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    # S_churn = 0: deterministic, whatever the generator
    a = heun_sample(
        edm_oracle(d), d, x_T, 10, generator=torch.Generator().manual_seed(1), clip_denoised=False
    )
    b = heun_sample(
        edm_oracle(d), d, x_T, 10, generator=torch.Generator().manual_seed(2), clip_denoised=False
    )
    assert torch.equal(a, b)
    churn = {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.0}
    c = heun_sample(
        edm_oracle(d), d, x_T, 64, generator=torch.Generator().manual_seed(1), clip_denoised=False, **churn
    )
    e = heun_sample(
        edm_oracle(d), d, x_T, 64, generator=torch.Generator().manual_seed(2), clip_denoised=False, **churn
    )
    assert not torch.allclose(c, e)
    # the churn adds the noise that keeps the marginals: samples still have mean mu and std s (65536 scalars:
    # standard errors 0.002 / 0.0014; discretisation: std +0.008 at 64 steps, shrinking with N; S_noise = 0.8
    # or 1.2 moves the std by -0.09 / +0.11)
    for x in (c, e):
        assert abs(x.mean().item() - MU) < 0.01 and abs(x.std().item() - S) < 0.02, (x.mean(), x.std())
    with pytest.raises(ValueError, match="S_churn"):
        heun_sample(edm_oracle(d), d, x_T[:2], 4, S_churn=-1.0)


def test_heun_churn_with_a_wrong_noise_scale_is_detected():
    """The moment check above can fail: churn noise that is too small shrinks the samples."""
    d = EDMDiffusion()
    x_T = torch.randn(4096, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x = heun_sample(
        edm_oracle(d),
        d,
        x_T,
        64,
        generator=torch.Generator().manual_seed(1),
        clip_denoised=False,
        S_churn=40.0,
        S_tmin=0.05,
        S_tmax=50.0,
        S_noise=0.8,
    )
    assert x.std().item() - S < -0.05  # observed -0.094


# ----------------------------------------------------- across the families: DDPM models with Euler / Heun


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_euler_heun_sample_ddpm_family_models(param):
    d = GaussianDiffusion(make_schedule("linear", 1000), parameterization=param)
    shape = (4096, 1, 4, 4)
    for fn, steps, std_bias in ((heun_sample, 18, 0.025), (euler_sample, 40, 0.04)):
        x = sample(discrete_oracle(d), d, shape, sampler=fn, steps=steps, seed=0, clip_denoised=False)
        # observed: Heun-18 mean -0.004, std +0.021; Euler-40 mean -0.004, std -0.033
        assert abs(x.mean().item() - MU) < 0.012 and abs(x.std().item() - S) < std_bias, (x.mean(), x.std())


@pytest.mark.parametrize("grid", ["karras", "uniform", "trailing"])
@pytest.mark.parametrize("param", ["eps", "v"])
def test_euler_on_a_ddpm_model_is_ddim(param, grid):
    """DDIM (eta = 0) is Euler's method in sigma (EDM Sec. 3): on the same steps the two agree exactly,
    which checks sigma_t = sqrt((1 - alpha_bar) / alpha_bar), the scaling x_t = x / sqrt(1 + sigma^2), D."""
    d = GaussianDiffusion(make_schedule("cosine", 1000), parameterization=param)
    x_T = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    opts = {"sigma_max": 80.0} if grid == "karras" else {}
    a = euler_sample(discrete_oracle(d), d, x_T, 12, grid=grid, grid_opts=opts, clip_denoised=False)
    top = float(discrete_sigmas(d)[make_grid(grid, d, 12, **opts)[0]])
    # Euler starts at x = sigma_0 z, DDIM at x_t = z': the same state for z' = sigma_0 / sqrt(1 + sigma_0^2) z
    b = ddim_sample(
        discrete_oracle(d),
        d,
        x_T * top / math.sqrt(1 + top**2),
        12,
        grid=grid,
        grid_opts=opts,
        clip_denoised=False,
    )
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # float32 schedule tables


def test_zero_terminal_snr_and_learned_variance_models_with_heun():
    d = GaussianDiffusion(make_schedule("linear", 1000, zero_terminal_snr=True), parameterization="v")
    x = sample(
        discrete_oracle(d), d, (4096, 1, 4, 4), sampler=heun_sample, steps=20, seed=0, clip_denoised=False
    )
    assert abs(x.mean().item() - MU) < 0.012 and abs(x.std().item() - S) < 0.03  # observed -0.004, +0.018
    dl = GaussianDiffusion(make_schedule("cosine", 100), parameterization="eps", variance="learned_range")
    oracle = discrete_oracle(dl)

    def with_variance(x_t, t, y=None):
        out = oracle(x_t, t, y)
        return torch.cat([out, torch.full_like(out, 0.7)], dim=1)

    df = GaussianDiffusion(make_schedule("cosine", 100), parameterization="eps")
    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = heun_sample(with_variance, dl, x_T, 10, clip_denoised=False)  # the variance channels are ignored
    torch.testing.assert_close(a, heun_sample(discrete_oracle(df), df, x_T, 10, clip_denoised=False))


# ------------------------------------------------- across the families: EDM models with discrete samplers


def test_edm_models_with_ddim_dpm_solver_and_ddpm():
    d = EDMDiffusion()
    oracle = edm_oracle(d)
    x_T = torch.randn(4096, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # DDIM (eta = 0) on the discrete view is Euler on the same sigmas (up to the start, x = sigma_0 z)
    top = float(d.schedule_sigmas()[-1])
    a = ddim_sample(oracle, d, x_T[:64], 18, clip_denoised=False)
    b = euler_sample(
        oracle, d, x_T[:64] * math.sqrt(1 + top**2) / top, 18, grid="uniform", clip_denoised=False
    )
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # DPM-Solver++(2M) is second order: at 18 NFE it is close to the exact solution
    x = dpm_solver_sample(oracle, d, x_T, 18, clip_denoised=False)
    exact = exact_solution(x_T * math.sqrt(1 + top**2) / top, top)
    assert (x - exact).abs().max().item() < 0.05, (x - exact).abs().max()  # observed 0.016
    # ancestral sampling with the fixed variance of the discrete view has the data's moments
    x = ddpm_sample(
        oracle, d, x_T.float(), 250, generator=torch.Generator().manual_seed(1), clip_denoised=False
    )
    assert abs(x.mean().item() - MU) < 0.01 and abs(x.std().item() - S) < 0.02, (x.mean(), x.std())


def test_edm_discrete_view_respaces_to_edm():
    d = EDMDiffusion(discrete_steps=100)
    r = d.respace([0, 10, 50, 99])
    assert isinstance(r, EDMDiffusion) and r.num_timesteps == 4
    torch.testing.assert_close(r.schedule_sigmas(), d.schedule_sigmas()[[0, 10, 50, 99]])
    assert r.timestep_map.tolist() == [0, 10, 50, 99]
    counter = NFECounter(edm_oracle(d))
    x = dpm_solver_sample(counter, d, torch.randn(2, 1, 4, 4), 7)
    assert counter.nfe == 7 and torch.isfinite(x).all()


def test_guidance_on_edm_models():
    """Classifier-free guidance on D: class c has mean MUS[c], the null class (index 2) the mixture's 0."""
    d = EDMDiffusion()
    mus = torch.tensor([-0.5, 0.5, 0.0])
    calls = []

    def model_fn(x_in, c_noise, y=None):
        calls.append(x_in.shape[0])
        sigma = (4.0 * c_noise).exp().reshape(-1, 1, 1, 1)
        mu = mus[y].reshape(-1, 1, 1, 1)
        x = x_in / d.precond.c_in(sigma)
        D = mu + 0.1**2 / (0.1**2 + sigma**2) * (x - mu)
        return (D - d.precond.c_skip(sigma) * x) / d.precond.c_out(sigma)

    model_fn.num_classes = 2
    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 0, 1])
    x1 = euler_sample(model_fn, d, x_T, 10, y=y, clip_denoised=False)
    x3 = euler_sample(model_fn, d, x_T, 10, y=y, guidance_scale=3.0, clip_denoised=False)
    assert calls[-1] == 8  # conditional and unconditional halves in one batch of 2B
    # guidance pushes each class away from the unconditional mean 0: D = 0 + 3 (mu_c - 0) at small sigma
    assert x1[y == 1].mean().item() == pytest.approx(0.5, abs=0.05)
    assert x3[y == 1].mean().item() == pytest.approx(1.5, abs=0.1)
    assert x3[y == 0].mean().item() == pytest.approx(-1.5, abs=0.1)
