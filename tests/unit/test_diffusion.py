"""The Gaussian diffusion math against closed forms computed independently in the tests."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffusion_lab.processes.diffusion import GaussianDiffusion
from diffusion_lab.processes.likelihood import discretized_gaussian_log_likelihood, normal_kl
from diffusion_lab.processes.parameterization import PARAMETERIZATIONS, EpsPrediction, Parameterization
from diffusion_lab.processes.schedules import make_schedule
from diffusion_lab.samplers.timesteps import make_grid


def _diffusion(name="linear", T=100, **kw):
    return GaussianDiffusion(make_schedule(name, T), **kw)


def test_q_sample_moments_monte_carlo():
    d = _diffusion("cosine", 100)
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([0.7, -0.3, 0.0, 1.0]).reshape(1, 4, 1, 1)
    n = 200_000
    for step in [0, 30, 99]:
        t = torch.full((n,), step)
        eps = torch.randn(n, 4, 1, 1, generator=g)
        xt = d.q_sample(x0.expand(n, -1, -1, -1), t, eps)
        ab = d.schedule.alphas_cumprod[step].item()
        mean, var = math.sqrt(ab) * x0.flatten(), 1 - ab
        se = math.sqrt(var / n)
        assert torch.allclose(xt.mean(0).flatten(), mean.float(), atol=5 * se)
        assert torch.allclose(xt.var(0).flatten(), torch.full((4,), var), rtol=0.02)
        m, v, lv = d.q_mean_variance(x0, t[:1])
        assert torch.allclose(m.flatten(), mean.float(), atol=1e-6)
        assert torch.allclose(v, torch.full_like(v, var), atol=1e-6)
        assert torch.allclose(lv.exp(), v, rtol=1e-5)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_matches_gaussian_product(name):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): the product of two Gaussians in x_{t-1}."""
    d = _diffusion(name, 200)
    sched = d.schedule
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    xt = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 5, 50, 100, 150, 199])
    mean, var, log_var = d.q_posterior_mean_variance(x0.float(), xt.float(), t)
    for i, step in enumerate(t.tolist()):
        beta = sched.betas[step]
        alpha = 1 - beta
        ab_prev = sched.alphas_cumprod[step - 1]
        precision = alpha / beta + 1 / (1 - ab_prev)
        expect_var = 1 / precision
        expect_mean = (alpha.sqrt() * xt[i] / beta + ab_prev.sqrt() * x0[i] / (1 - ab_prev)) / precision
        assert torch.allclose(mean[i].double(), expect_mean, atol=2e-5)
        assert torch.allclose(var[i].double(), expect_var.expand_as(var[i]), rtol=1e-4)
        assert torch.allclose(log_var[i].exp().double(), expect_var.expand_as(var[i]), rtol=1e-4)
    # t = 0: the posterior is a point mass at x_0; the log-variance is clipped to the next step's.
    m0, v0, lv0 = d.q_posterior_mean_variance(x0.float(), xt.float(), torch.zeros(6, dtype=torch.long))
    assert torch.allclose(m0, x0.float(), atol=1e-6)
    assert (v0 == 0).all()
    assert torch.allclose(lv0, torch.log(d.posterior_variance[1]).expand_as(lv0))


@pytest.mark.parametrize("pname", sorted(PARAMETERIZATIONS))
@pytest.mark.parametrize("sched", ["linear", "cosine"])
def test_parameterization_round_trip(pname, sched):
    # x0 from eps divides by sqrt(alpha_bar) (0.006 at t=T for cosine): run the tables in float64.
    d64 = _diffusion(sched, 1000, parameterization=pname).double()
    torch.manual_seed(0)
    x0 = torch.rand(64, 1, 4, 4, dtype=torch.float64) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.randint(0, 1000, (64,))
    t[:2] = torch.tensor([0, 999])
    xt = d64.q_sample(x0, t, eps)
    out = d64.parameterization.target(x0, eps, t, d64)
    x0_hat, eps_hat = d64.parameterization.to_x0_eps(out, xt, t, d64)
    assert torch.allclose(eps_hat, eps, atol=1e-6)
    assert torch.allclose(x0_hat, x0, atol=1e-6)
    # eps -> x0 -> eps through the diffusion's own conversions, at moderate t
    tm = torch.randint(0, 700, (64,))
    xt = d64.q_sample(x0, tm, eps)
    eps_back = d64.eps_from_x0(xt, tm, d64.x0_from_eps(xt, tm, eps))
    assert torch.allclose(eps_back, eps, atol=1e-6)


def test_v_target_definition():
    d = _diffusion("cosine", 1000, parameterization="v")
    x0, eps, t = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2), torch.tensor([0, 500, 999])
    ab = d.schedule.alphas_cumprod[t].float().reshape(3, 1, 1, 1)
    assert torch.allclose(d.parameterization.target(x0, eps, t, d), ab.sqrt() * eps - (1 - ab).sqrt() * x0)


def test_normal_kl_against_torch_distributions():
    g = torch.Generator().manual_seed(2)
    m1, m2 = torch.randn(100, generator=g), torch.randn(100, generator=g)
    lv1, lv2 = torch.randn(100, generator=g), torch.randn(100, generator=g)
    ours = normal_kl(m1, lv1, m2, lv2)
    ref = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(normal_kl(m1, lv1, m1, lv1), torch.zeros(100), atol=1e-6)


def test_discretized_decoder_sums_to_one():
    g = torch.Generator().manual_seed(3)
    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 256 bin centres on [-1, 1]
    for _ in range(5):
        means = torch.rand(50, 1, generator=g, dtype=torch.float64) * 3 - 1.5
        log_scales = torch.rand(50, 1, generator=g, dtype=torch.float64) * 6 - 6  # std in [e^-6, 1]
        logp = discretized_gaussian_log_likelihood(values.expand(50, 256), means, log_scales)
        assert torch.allclose(logp.exp().sum(1), torch.ones(50, dtype=torch.float64), atol=1e-6)
    # an interior bin is exactly Phi(+h/sigma) - Phi(-h/sigma) around its own mean
    sigma = 0.01
    lp = discretized_gaussian_log_likelihood(
        torch.tensor([0.2]), torch.tensor([0.2]), torch.tensor([math.log(sigma)])
    )
    assert lp.exp().item() == pytest.approx(math.erf(1 / 255 / sigma / math.sqrt(2)), rel=1e-5)


def test_oracle_single_image_bpd_by_hand():
    """Data = one image x*. The exact denoiser predicts x* at every t; with fixed_small variance the
    reverse step equals the true posterior, so every KL term (t > 1) vanishes and the bound is the
    decoder term plus the prior term, both computed here by hand."""
    T = 50
    d = _diffusion("cosine", T, parameterization="eps", variance="fixed_small", loss="vlb")
    g = torch.Generator().manual_seed(4)
    pixels = torch.randint(0, 256, (1, 1, 6, 6), generator=g)
    pixels[0, 0, 0, :2] = torch.tensor([0, 255])  # make sure both outer bins are exercised
    x_star = pixels.float() / 127.5 - 1

    def oracle(x_t, t, y=None):  # eps such that x0_hat = x*
        return d.eps_from_x0(x_t, t, x_star.expand_as(x_t))

    x0 = x_star.expand(3, -1, -1, -1)
    res = d.bpd_bound(oracle, x0, generator=g)
    assert res["terms_bpd"][:, 1:].abs().max().item() < 1e-4

    ab = d.schedule.alphas_cumprod
    beta_tilde_2 = (d.schedule.betas[1] * (1 - ab[0]) / (1 - ab[1])).item()
    sigma, h = math.sqrt(beta_tilde_2), 1 / 255

    def phi(z):
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    nll_bits = []
    for k in pixels.flatten().tolist():
        p = phi(h / sigma) if k in (0, 255) else phi(h / sigma) - phi(-h / sigma)
        nll_bits.append(-math.log2(p))
    decoder = sum(nll_bits) / len(nll_bits)
    abT = ab[-1].item()
    prior = (
        sum(
            0.5 * (-1 - math.log(1 - abT) + (1 - abT) + abT * v**2) / math.log(2)
            for v in x_star.flatten().tolist()
        )
        / x_star.numel()
    )
    assert res["terms_bpd"][:, 0] == pytest.approx([decoder] * 3, rel=1e-3)
    assert res["prior_bpd"] == pytest.approx([prior] * 3, rel=1e-3, abs=1e-7)
    assert res["total_bpd"] == pytest.approx([decoder + prior] * 3, rel=1e-3)


def test_monte_carlo_bpd_is_unbiased():
    """E_t[T * L_t] + L_T equals the sum of all terms, for a fixed (imperfect) model."""
    T = 20
    d = _diffusion("linear", T, variance="fixed_large")
    torch.manual_seed(5)
    x0 = (torch.randint(0, 256, (1, 1, 4, 4)).float() / 127.5 - 1).expand(4000, -1, -1, -1)

    def model(x_t, t, y=None):
        return 0.5 * x_t

    exact = d.bpd_bound(model, x0[:500])["total_bpd"]
    mc = d.bpd_estimate(model, x0)
    se = math.sqrt(mc.var().item() / mc.numel() + exact.var().item() / exact.numel())
    assert abs(mc.mean().item() - exact.mean().item()) < 4 * se


def test_fixed_large_and_learned_range_variances():
    d_large = _diffusion("linear", 100, variance="fixed_large")
    d_lr = _diffusion("linear", 100, variance="learned_range")
    x = torch.randn(3, 1, 2, 2)
    t = torch.tensor([0, 1, 50])
    p = d_large.p_mean_variance(torch.zeros_like(x), x, t)
    b = d_large.schedule.betas.float()
    assert torch.allclose(p.variance[1:, 0, 0, 0], b[t[1:]], rtol=1e-5)
    assert p.variance[0, 0, 0, 0].item() == pytest.approx(d_large.posterior_variance[1].item(), rel=1e-5)
    # learned_range: v = +1 -> beta_t, v = -1 -> beta_tilde_t (Improved DDPM Eq. 15)
    for v, table in [(1.0, d_lr.betas), (-1.0, d_lr.posterior_variance)]:
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)
        pv = d_lr.p_mean_variance(out, x, t)
        assert torch.allclose(pv.variance[1:, 0, 0, 0], table[t[1:]], rtol=1e-4)
    with pytest.raises(ValueError, match="2 output channels"):
        d_lr.p_mean_variance(torch.zeros_like(x), x, t)


def test_losses_and_hybrid_stop_gradient():
    d = _diffusion("cosine", 100, variance="learned_range", loss="hybrid")
    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    out = torch.zeros(8, 2, 4, 4, requires_grad=True)
    terms = d.training_losses(lambda x, t, y: out, x0)
    assert set(terms) == {"loss", "mse", "vlb"}
    (grad_vlb,) = torch.autograd.grad(terms["vlb"].sum(), out, retain_graph=True)
    assert grad_vlb[:, :1].abs().max() == 0, "vlb must not move the mean in the hybrid loss"
    assert grad_vlb[:, 1:].abs().max() > 0, "vlb trains the variance"
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert grad_mse[:, 1:].abs().max() == 0
    expect = terms["mse"] + 0.001 * 100 * terms["vlb"]
    assert torch.allclose(terms["loss"], expect)

    dv = _diffusion("cosine", 100, variance="learned_range", loss="vlb")
    out2 = torch.zeros(8, 2, 4, 4, requires_grad=True)
    loss = dv.training_losses(lambda x, t, y: out2, x0)["loss"]
    (g2,) = torch.autograd.grad(loss.sum(), out2)
    assert g2[:, :1].abs().max() > 0, "the vlb objective trains the mean too"
    with pytest.raises(ValueError, match="hybrid"):
        _diffusion(loss="hybrid", variance="fixed_small")


def test_simple_loss_is_mse_on_target():
    for pname in PARAMETERIZATIONS:
        d = _diffusion("linear", 50, parameterization=pname)
        x0, eps, t = torch.rand(5, 1, 3, 3) * 2 - 1, torch.randn(5, 1, 3, 3), torch.randint(0, 50, (5,))
        target = d.parameterization.target(x0, eps, t, d)
        terms = d.training_losses(lambda x, tt, y: torch.zeros_like(x), x0, t=t, eps=eps)
        assert torch.allclose(terms["loss"], (target**2).flatten(1).mean(1))


def test_min_snr_weights():
    """Hang et al. 2023: weight min(SNR, gamma) on the x0 error, in each parameterization's own units."""
    t = torch.arange(0, 1000, 37)
    for pname in PARAMETERIZATIONS:
        d = _diffusion("cosine", 1000, parameterization=pname, loss_weighting="min_snr", min_snr_gamma=5.0)
        snr = d.snr[t]
        x0, eps = torch.randn(len(t), 1, 2, 2), torch.randn(len(t), 1, 2, 2)
        x_t = d.q_sample(x0, t, eps)
        pred = d.parameterization.target(x0, eps, t, d) + 0.1  # some error in the parameterization's units
        x0_hat, _ = d.parameterization.to_x0_eps(pred, x_t, t, d)
        param_err = ((pred - d.parameterization.target(x0, eps, t, d)) ** 2).flatten(1).mean(1)
        x0_err = ((x0_hat - x0) ** 2).flatten(1).mean(1)
        weighted = d.loss_weights(t) * param_err
        assert torch.allclose(weighted, snr.clamp(max=5.0) * x0_err, rtol=2e-3)


def test_respace_keeps_alpha_bars():
    d = _diffusion("cosine", 1000)
    keep = make_grid("uniform", d, 50).flip(0).tolist()
    assert len(keep) == 50 and keep[0] == 0 and keep[-1] == 999
    r = d.respace(keep)
    assert r.num_timesteps == 50
    assert torch.allclose(r.alphas_cumprod, d.alphas_cumprod[keep])
    assert r.timestep_map.tolist() == keep
    full = d.respace(range(1000))
    assert torch.allclose(full.betas, d.betas) and torch.allclose(
        full.posterior_variance, d.posterior_variance
    )
    r = d.respace([0, 7, 500, 998])  # any subset: alpha-bars kept, betas rebuilt (Improved DDPM Sec. 4)
    assert torch.allclose(r.alphas_cumprod, d.alphas_cumprod[[0, 7, 500, 998]])
    assert r.timestep_map.tolist() == [0, 7, 500, 998]


def test_zero_terminal_snr_needs_v_or_x0():
    sched = make_schedule("cosine", 100, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="eps-prediction .* use parameterization x0 or v"):
        GaussianDiffusion(sched, parameterization="eps")
    d = GaussianDiffusion(sched, parameterization="v")
    x0 = torch.rand(4, 1, 2, 2) * 2 - 1
    terms = d.training_losses(lambda x, t, y: torch.zeros_like(x), x0, t=torch.full((4,), 99))
    assert torch.isfinite(terms["loss"]).all()


class ScaledEps(Parameterization):
    """A parameterization the library does not know: the network predicts 2 eps."""

    name = "eps_x2"
    supports_zero_terminal_snr = False

    def target(self, x0, eps, t, d):
        return 2.0 * eps

    def to_x0_eps(self, out, x_t, t, d):
        return EpsPrediction().to_x0_eps(out / 2.0, x_t, t, d)

    def x0_error_scale(self, snr):
        return 4.0 * snr  # ||d (2 eps)||^2 = 4 SNR ||d x0||^2


def test_new_parameterization_is_one_class():
    """A parameterization defined here runs through losses, min-SNR, p_mean_variance and respacing."""
    T, B = 100, 6
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(B, 1, 3, 3, generator=g) * 2 - 1, torch.randn(B, 1, 3, 3, generator=g)
    t = torch.tensor([0, 1, 20, 50, 80, 99])
    kw = dict(loss_weighting="min_snr", min_snr_gamma=5.0)
    new, ref = _diffusion("cosine", T, parameterization=ScaledEps(), **kw), _diffusion("cosine", T, **kw)
    net_eps = lambda x, tt, y: 0.3 * x  # noqa: E731  an arbitrary eps-network
    net_new = lambda x, tt, y: 2.0 * net_eps(x, tt, y)  # noqa: E731  the same network in 2-eps units
    a = new.training_losses(net_new, x0, t=t, eps=eps)
    b = ref.training_losses(net_eps, x0, t=t, eps=eps)
    torch.testing.assert_close(a["mse"], 4.0 * b["mse"])  # error measured in the new units
    torch.testing.assert_close(a["loss"], b["loss"])  # min-SNR: the same weight on the x0 error
    x_t = ref.q_sample(x0, t, eps)
    p, q = (
        new.p_mean_variance(net_new(x_t, t, None), x_t, t),
        ref.p_mean_variance(net_eps(x_t, t, None), x_t, t),
    )
    for field in ("mean", "variance", "pred_x0", "pred_eps"):
        torch.testing.assert_close(getattr(p, field), getattr(q, field))
    assert new.respace(range(0, T, 10)).parameterization.name == "eps_x2"
    with pytest.raises(ValueError, match="eps_x2-prediction"):
        GaussianDiffusion(make_schedule("cosine", T, zero_terminal_snr=True), parameterization=ScaledEps())
