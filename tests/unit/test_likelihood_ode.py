"""Probability-flow ODE likelihood against closed forms.

For Gaussian data x_0 ~ N(mu, Sigma) every Gaussian path x_t = alpha x_0 + sigma eps has Gaussian marginals
N(alpha mu, alpha^2 Sigma + sigma^2 I) and an exact probability-flow drift

  f(x, t) = d_alpha E[x_0 | x_t] + d_sigma E[eps | x_t]
          = d_alpha mu + (d_alpha alpha Sigma + sigma d_sigma I) (alpha^2 Sigma + sigma^2 I)^-1 (x - alpha mu)

the same field as (d_alpha / alpha) x - (sigma d_sigma - (d_alpha / alpha) sigma^2) score (Song et al. 2021,
App. D.1 with f = d log alpha, g^2 = d sigma^2 - 2 d log alpha sigma^2), but finite where alpha = 0. Plugged
in as the model, the ODE's NLL must equal the analytic log-density.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from diffusion_lab.processes.likelihood_ode import (
    bpd_ode,
    bpd_offset,
    dequantize,
    gaussian_prior,
    model_bpd_ode,
    ode_nll,
    require_flow,
)

F64 = torch.float64

# ------------------------------------------------------------------------------- paths of the tests


class LinearPath:  # rectified flow / flow matching: alpha = 1 - t, sigma = t
    t_min, t_max = 0.0, 1.0

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return -torch.ones_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)


class GVPPath:  # trigonometric: alpha = cos(pi t / 2), sigma = sin(pi t / 2)
    t_min, t_max = 0.0, 1.0

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t):
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_sigma(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)


class VPSDEPath:  # Song et al. 2021 VP-SDE, beta(t) = 0.1 + 19.9 t; sigma = sqrt(1 - alpha^2)
    t_min, t_max = 1e-5, 1.0
    b0, b1 = 0.1, 20.0

    def alpha(self, t):
        return torch.exp(-0.25 * t**2 * (self.b1 - self.b0) - 0.5 * t * self.b0)

    def sigma(self, t):
        return torch.sqrt(1 - self.alpha(t) ** 2)

    def d_alpha(self, t):
        return -0.5 * (self.b0 + t * (self.b1 - self.b0)) * self.alpha(t)

    def d_sigma(self, t):
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)


class VEPath:  # variance exploding (EDM-like): alpha = 1, sigma = t sigma_max
    t_min, t_max = 0.0, 1.0
    sigma_max = 20.0

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        return t * self.sigma_max

    def d_alpha(self, t):
        return torch.zeros_like(t)

    def d_sigma(self, t):
        return torch.full_like(t, self.sigma_max)


PATHS = {"linear": LinearPath(), "gvp": GVPPath(), "vp_sde": VPSDEPath(), "ve": VEPath()}


class GaussianData:
    """x_0 ~ N(mu, Sigma) on D dimensions, Sigma = Q diag(lam) Q^T (not diagonal: Rademacher probes then have
    a nonzero variance), and the exact drift and marginals of a path."""

    def __init__(self, D: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.D = D
        self.mu = torch.randn(D, generator=g, dtype=F64) * 0.5
        self.lam = torch.rand(D, generator=g, dtype=F64) * 0.5 + 0.05
        self.Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))

    def cov(self, a, s):
        return self.Q @ torch.diag(a**2 * self.lam + s**2) @ self.Q.T

    def marginal(self, path, t: float) -> MultivariateNormal:
        tt = torch.tensor(t, dtype=F64)
        a, s = path.alpha(tt), path.sigma(tt)
        return MultivariateNormal(a * self.mu, covariance_matrix=self.cov(a, s))

    def drift(self, path):
        def f(x, t):  # x (B, ...), t (B,)
            shape = x.shape
            x = x.flatten(1)
            a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]  # (B, 1)
            da, ds = path.d_alpha(t)[:, None], path.d_sigma(t)[:, None]
            gain = (da * a * self.lam + s * ds) / (a**2 * self.lam + s**2)  # (B, D) eigenvalues
            r = (x - a * self.mu) @ self.Q  # (B, D) in the eigenbasis
            return (da * self.mu + (gain * r) @ self.Q.T).reshape(shape)

        return f

    def sample(self, n: int, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.D, generator=g, dtype=F64)
        return self.mu + (z * self.lam.sqrt()) @ self.Q.T


def _exact_prior(data: GaussianData, path, t1: float):
    dist = data.marginal(path, t1)
    return lambda z: dist.log_prob(z.flatten(1))


# -------------------------------------------------------------------------------------- the ODE NLL


@pytest.mark.parametrize("name", list(PATHS))
def test_ode_nll_equals_gaussian_log_density_on_every_path(name):
    path, data = PATHS[name], GaussianData(D=4)
    x = data.sample(16)
    t0, t1 = path.t_min, path.t_max
    out = ode_nll(
        data.drift(path), x, t0, t1, _exact_prior(data, path, t1), divergence="exact", rtol=1e-7, atol=1e-7
    )
    expected = -data.marginal(path, t0).log_prob(x)
    assert out.nfe > 0
    torch.testing.assert_close(out.nll, expected, rtol=0, atol=1e-5)


def test_ode_nll_error_shrinks_with_the_tolerance():
    path, data = PATHS["vp_sde"], GaussianData(D=3)
    x = data.sample(8)
    expected = -data.marginal(path, path.t_min).log_prob(x)
    errors, nfes = [], []
    for tol in (1e-3, 1e-5, 1e-7):
        out = ode_nll(
            data.drift(path), x, path.t_min, 1.0, _exact_prior(data, path, 1.0), "exact", rtol=tol, atol=tol
        )
        errors.append((out.nll - expected).abs().max().item())
        nfes.append(out.nfe)
    assert errors[2] < errors[0] and errors[2] < 1e-5, errors
    assert nfes[0] < nfes[1] < nfes[2], nfes


def test_gaussian_prior_is_the_marginal_where_alpha_vanishes_and_close_on_ve():
    data = GaussianData(D=4)
    z = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(gaussian_prior(1.0)(z), data.marginal(LinearPath(), 1.0).log_prob(z))
    ve = VEPath()  # the marginal is N(mu, Sigma + sigma_max^2 I); the prior N(0, sigma_max^2 I) misses it by
    prior = MultivariateNormal(torch.zeros(4, dtype=F64), ve.sigma_max**2 * torch.eye(4, dtype=F64))
    torch.testing.assert_close(gaussian_prior(ve.sigma_max)(z * 7), prior.log_prob(z * 7))
    kl = torch.distributions.kl_divergence(data.marginal(ve, 1.0), prior).item()  # ~ |mu|^2 / (2 sigma_max^2)
    assert 0 < kl < (data.mu.square().sum() + data.lam.sum()).item() / (2 * ve.sigma_max**2)


@pytest.mark.parametrize("probes", ["rademacher", "gaussian"])
def test_hutchinson_agrees_with_the_exact_divergence_within_its_standard_error(probes):
    path, data = PATHS["gvp"], GaussianData(D=4, seed=3)
    x = data.sample(1).expand(400, -1).clone()  # one point, 400 independent probes
    prior, f = _exact_prior(data, path, 1.0), data.drift(path)
    exact = ode_nll(f, x[:1], 0.0, 1.0, prior, "exact", rtol=1e-6, atol=1e-6).nll
    g = torch.Generator().manual_seed(0)
    one = ode_nll(f, x, 0.0, 1.0, prior, "hutchinson", probes, 1, rtol=1e-6, atol=1e-6, generator=g).nll
    four = ode_nll(f, x, 0.0, 1.0, prior, "hutchinson", probes, 4, rtol=1e-6, atol=1e-6, generator=g).nll
    se = one.std() / math.sqrt(len(one))
    assert se > 1e-3  # the estimator really is noisy (not the exact divergence in disguise)
    assert (one.mean() - exact).abs() < 4 * se
    assert (four.mean() - exact).abs() < 4 * four.std() / math.sqrt(len(four))
    ratio = (four.var() / one.var()).item()  # the variance falls as 1 / n_probes
    assert 0.15 < ratio < 0.4, ratio


# -------------------------------------------------------------------------------- fixed-step solves


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_fixed_steps_converge_to_the_adaptive_solve(method):
    path, data = PATHS["linear"], GaussianData(D=4, seed=2)
    x = data.sample(8)
    prior, f = _exact_prior(data, path, 1.0), data.drift(path)
    adaptive = ode_nll(f, x, 0.0, 1.0, prior, "exact", rtol=1e-8, atol=1e-8).nll
    errors = [
        (ode_nll(f, x, 0.0, 1.0, prior, "exact", method=method, steps=n).nll - adaptive).abs().max().item()
        for n in (4, 16, 64)
    ]
    assert errors[0] > errors[1] > errors[2], errors
    order = 1 if method == "euler" else 2  # 4x the steps: the error falls by about 4^order
    assert errors[1] / errors[2] > 0.75 * 4**order, errors


def test_fixed_steps_do_the_same_work_on_every_batch():
    path, data = PATHS["gvp"], GaussianData(D=4)
    f, prior = data.drift(path), _exact_prior(data, path, 1.0)
    nfes = {
        (method, seed): ode_nll(f, data.sample(4, seed), 0.0, 1.0, prior, method=method, steps=10).nfe
        for method in ("euler", "heun")
        for seed in (1, 2)
    }
    assert nfes == {("euler", 1): 10, ("euler", 2): 10, ("heun", 1): 20, ("heun", 2): 20}


def test_runs_under_inference_mode_without_touching_parameter_gradients():
    path, data = PATHS["linear"], GaussianData(D=4)
    w = torch.nn.Parameter(torch.ones((), dtype=F64))
    exact = data.drift(path)

    def f(x, t):
        return w * exact(x, t)

    x, prior = data.sample(4), _exact_prior(data, path, 1.0)
    reference = ode_nll(f, x, 0.0, 1.0, prior, "exact", method="heun", steps=8).nll
    with torch.inference_mode():
        inside = ode_nll(f, x.clone(), 0.0, 1.0, prior, "exact", method="heun", steps=8).nll
    torch.testing.assert_close(inside, reference)
    assert w.grad is None


def test_bad_options_fail_with_clear_errors():
    f, x, prior = (lambda x, t: x), torch.zeros(2, 3), gaussian_prior(1.0)
    with pytest.raises(ValueError, match="fixed-step method"):
        ode_nll(f, x, 0.0, 1.0, prior, method="dopri5", steps=10)
    with pytest.raises(ValueError, match="give steps=N"):
        ode_nll(f, x, 0.0, 1.0, prior, method="euler")
    with pytest.raises(ValueError, match="divergence"):
        ode_nll(f, x, 0.0, 1.0, prior, divergence="trace")
    with pytest.raises(ValueError, match="integer pixel values"):
        bpd_ode(f, torch.rand(2, 1, 2, 2) * 2 - 1, 0.0, 1.0, prior)
    with pytest.raises(ValueError, match="no probability-flow ODE"):
        require_flow(object())


# ------------------------------------------------------------------------------------ bits per dim


def _uniform_logp(low: float, high: float):
    def logp(z):
        z = z.flatten(1)
        inside = ((z >= low) & (z < high)).all(1)
        value = -z.shape[1] * math.log(high - low)
        return torch.where(inside, torch.full_like(z[:, 0], value), torch.full_like(z[:, 0], -math.inf))

    return logp


@pytest.mark.parametrize("dequantization", ["centered", "song"])
def test_uniform_density_on_the_dequantized_support_costs_8_bits_per_dim(dequantization):
    """The uniform density over all 256 bins is the uniform 8-bit distribution: 8 bits/dim exactly, i.e.
    -log p / (D ln 2) + offset = log2(width / 2) + log2(K / width * 2) ... = 8 for either layout."""
    low, high = (-1 - 1 / 255, 1 + 1 / 255) if dequantization == "centered" else (-1.0, 1.0)
    images = torch.randint(0, 256, (64, 1, 3, 3), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    images[0], images[1] = 0, 255  # the outermost bins
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731 - the identity flow: the prior is the model
    bpd, nfe = bpd_ode(
        zero,
        images,
        0.0,
        1.0,
        _uniform_logp(low, high),
        dequantization=dequantization,
        dtype=F64,
        method="euler",
        steps=1,
        divergence="exact",
    )
    torch.testing.assert_close(bpd, torch.full_like(bpd, 8.0), rtol=0, atol=1e-9)
    assert nfe == 1


def test_offsets_are_log2_of_the_bins_per_unit():
    assert bpd_offset(dequantization="song") == 7.0
    assert bpd_offset(dequantization="centered") == pytest.approx(7 - math.log2(256 / 255))


def test_dequantized_bits_per_dim_of_a_gaussian_match_the_closed_form_and_bound_the_discrete_nll():
    """Model N(m, s^2 I) (through the exact linear-path field); E_u[-log p(x_k + u)] over the bin [a, b) is
    1/2 log(2 pi s^2) + ((b - m)^3 - (a - m)^3) / (6 s^2 (b - a)) per pixel, and it is >= -log P(bin)."""
    m, s = -0.2, 0.3
    data = GaussianData(D=4)
    data.mu, data.lam, data.Q = (
        torch.full((4,), m, dtype=F64),
        torch.full((4,), s**2, dtype=F64),
        torch.eye(4, dtype=F64),
    )
    path = LinearPath()
    images = torch.tensor([[30, 120, 128, 200]], dtype=torch.uint8).expand(300, -1).reshape(300, 1, 2, 2)
    g = torch.Generator().manual_seed(0)
    bpd, _ = bpd_ode(
        data.drift(path),
        images,
        0.0,
        1.0,
        gaussian_prior(1.0),
        dtype=F64,
        generator=g,
        divergence="exact",
        rtol=1e-7,
        atol=1e-7,
    )
    x = images[0].flatten().to(F64) / 127.5 - 1
    a, b = x - 1 / 255, x + 1 / 255
    nats = 0.5 * math.log(2 * math.pi * s**2) + ((b - m) ** 3 - (a - m) ** 3) / (6 * s**2 * (b - a))
    expected = (nats.sum() / (4 * math.log(2)) + bpd_offset()).item()
    se = (bpd.std() / math.sqrt(len(bpd))).item()
    assert abs(bpd.mean().item() - expected) < 4 * se + 1e-6
    cdf = torch.distributions.Normal(m, s).cdf
    discrete_bits = -(torch.log(cdf(b) - cdf(a))).sum().item() / (4 * math.log(2))
    assert expected >= discrete_bits


def test_dequantize_fills_each_bin_around_the_training_values():
    images = torch.tensor([0, 17, 255], dtype=torch.uint8).reshape(3, 1, 1, 1).expand(3, 1, 1, 2000)
    x = dequantize(images, generator=torch.Generator().manual_seed(0), dtype=F64)
    centre = images.to(F64) / 127.5 - 1
    assert ((x - centre).abs() <= 1 / 255).all()
    torch.testing.assert_close(x.mean(-1), centre.mean(-1), rtol=0, atol=3e-4)
    song = dequantize(images, dequantization="song", generator=torch.Generator().manual_seed(0), dtype=F64)
    assert song.min() >= -1 and song.max() < 1


# ------------------------------------------------------------------------ through an objective's path


class FakeFlowObjective:
    """The objective contract: ``path()`` and ``velocity(model, x, t, y)``, with the exact Gaussian field."""

    def __init__(self, path, data: GaussianData):
        self._path, self.data, self.calls = path, data, 0

    def path(self):
        return self._path

    def velocity(self, model, x, t, y=None):
        self.calls += 1
        return self.data.drift(self._path)(x.to(F64), t.to(F64)).to(x.dtype)


def test_model_bpd_ode_integrates_the_objective_path_to_its_prior():
    data = GaussianData(D=4)
    objective = FakeFlowObjective(LinearPath(), data)
    images = torch.randint(0, 256, (6, 1, 2, 2), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    bpd, nfe = model_bpd_ode(
        objective,
        None,
        images,
        generator=torch.Generator().manual_seed(0),
        dtype=F64,
        divergence="exact",
        rtol=1e-7,
        atol=1e-7,
    )
    x = dequantize(images, generator=torch.Generator().manual_seed(0), dtype=F64).flatten(1)
    expected = -data.marginal(LinearPath(), 0.0).log_prob(x) / (4 * math.log(2)) + bpd_offset()
    torch.testing.assert_close(bpd, expected, rtol=0, atol=1e-5)
    assert nfe == objective.calls


# ------------------------------------------------------------- wiring: validation and the evaluate loop


class FakeTrainableFlow(FakeFlowObjective):
    """Enough of an objective for DiffusionModule.validation_step, without the discrete bound."""

    has_likelihood = False

    def sample_timesteps(self, batch, device=None, generator=None):
        return torch.rand(batch, device=device, generator=generator)

    def training_losses(self, model_fn, x0, t=None, eps=None, y=None):
        return {"loss": torch.zeros(x0.shape[0])}


def _diagonal_data(D: int = 4) -> GaussianData:
    data = GaussianData(D=D)  # diagonal: one Rademacher probe gives the exact divergence
    data.Q, data.lam = torch.eye(D, dtype=F64), torch.linspace(0.2, 0.5, D, dtype=F64)
    return data


def _lit_module(objective, images: int = 8):
    from functools import partial

    from diffusion_lab.training.lit_module import DiffusionModule

    model = torch.nn.Linear(1, 1)
    module = DiffusionModule(
        model, objective, partial(torch.optim.SGD, lr=0.1), image_shape=(1, 2, 2), val_bpd_ode_images=images
    )
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    return module, logged


def test_validation_logs_bpd_ode_for_an_objective_with_a_velocity_and_no_bound():
    data = _diagonal_data()
    module, logged = _lit_module(FakeTrainableFlow(LinearPath(), data), images=6)
    pixels = torch.randint(0, 256, (10, 1, 2, 2), generator=torch.Generator().manual_seed(3))
    x0 = pixels.float() / 127.5 - 1
    with torch.inference_mode():  # as Lightning runs validation
        module.validation_step((x0, torch.zeros(10, dtype=torch.long)), batch_idx=0)
    assert "val/bpd" not in logged
    x = dequantize(pixels[:6], generator=torch.Generator().manual_seed(20_000)).to(F64).flatten(1)
    expected = (-data.marginal(LinearPath(), 0.0).log_prob(x) / (4 * math.log(2)) + bpd_offset()).mean()
    assert logged["val/bpd_ode"] == pytest.approx(expected.item(), abs=0.02)  # Heun, 8 fixed steps
    logged.clear()
    module.validation_step((x0, torch.zeros(10, dtype=torch.long)), batch_idx=1)
    assert "val/bpd_ode" not in logged  # the first batch only: a cheap check


def test_validation_skips_bpd_ode_without_a_velocity_or_when_off():
    class NoFlow(FakeTrainableFlow):
        velocity = None

    for objective, images in (
        (NoFlow(LinearPath(), _diagonal_data()), 8),
        (FakeTrainableFlow(LinearPath(), _diagonal_data()), 0),
    ):
        module, logged = _lit_module(objective, images)
        module.validation_step((torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)), batch_idx=0)
        assert "val/loss" in logged and "val/bpd_ode" not in logged


def test_ode_bpd_over_images_reports_mean_stderr_and_nfe_with_a_bar(monkeypatch, capfd):
    from diffusion_lab.metrics.bpd_ode import ode_bpd_over_images

    monkeypatch.setenv("DIFFUSION_LAB_PROGRESS", "1")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    objective = FakeFlowObjective(LinearPath(), _diagonal_data())
    images = torch.randint(0, 256, (10, 1, 2, 2), generator=torch.Generator().manual_seed(4)).to(torch.uint8)
    out = ode_bpd_over_images(objective, None, images, None, batch_size=4, options={"steps": 16})
    assert out["bpd_ode_images"] == 10 and out["bpd_ode_nfe"] == 32  # steps alone: Heun, 2 per step
    assert out["bpd_ode_stderr"] > 0 and out["bpd_ode_seconds_per_image"] > 0
    x = dequantize(images, generator=torch.Generator().manual_seed(0)).to(F64).flatten(1)
    per_image = -data_log_prob(objective, x) / (4 * math.log(2)) + bpd_offset()
    assert out["bpd_ode"] == pytest.approx(per_image.mean().item(), abs=0.02)
    assert "bits/dim (probability-flow ODE)" in capfd.readouterr().err
    with pytest.raises(ValueError, match="unknown option"):
        ode_bpd_over_images(objective, None, images, None, batch_size=4, options={"tol": 1e-3})


def data_log_prob(objective: FakeFlowObjective, x: torch.Tensor) -> torch.Tensor:
    return objective.data.marginal(objective.path(), 0.0).log_prob(x)


def test_autocast_does_not_lower_the_precision_of_the_solve():
    path, data = PATHS["gvp"], GaussianData(D=4)
    x, prior = data.sample(4).float(), _exact_prior(data, path, 1.0)
    lin = torch.nn.Linear(4, 4).float()
    with torch.no_grad():
        lin.weight.copy_(torch.eye(4))
        lin.bias.zero_()
    exact = data.drift(path)

    def f(x, t):  # the exact field through a layer that autocast would run in bf16
        return lin(exact(x.double(), t.double()).float())

    reference = ode_nll(f, x, 0.0, 1.0, lambda z: prior(z.double()).float(), "exact", method="heun", steps=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ode_nll(f, x, 0.0, 1.0, lambda z: prior(z.double()).float(), "exact", method="heun", steps=8)
    assert inside.nll.dtype == torch.float32
    torch.testing.assert_close(inside.nll, reference.nll)
