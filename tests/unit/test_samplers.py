"""Samplers against the exact oracle: Gaussian data, whose ideal denoiser is known in closed form.

For data x_0 ~ N(mu, s^2 I) and x_t = a x_0 + sigma eps (a = sqrt(alpha_bar_t), sigma^2 = 1 - alpha_bar_t):

    E[x_0 | x_t] = mu + (a s^2 / (a^2 s^2 + sigma^2)) (x_t - a mu)

Plugged in as "the model" (converted to eps / x0 / v units by the parameterization), every sampler must
return samples with mean mu and standard deviation s, up to
  * Monte Carlo error: N = B * D independent scalars, standard errors s / sqrt(N) (mean) and
    s / sqrt(2N) (std); the tests allow 4 of them;
  * discretisation bias of the sampler at that step count ("slack" below). The values are the exact
    biases (moment recursion for DDPM/DDIM, the exact affine map for the deterministic samplers) rounded
    up, e.g. fixed-small DDPM under-disperses (it drops the Var[x_0 | x_t] term of the true reverse
    variance), DDIM is first order in the step size, DPM-Solver++(2M) second order.
Sharper checks follow: sample moments against an independent float64 moment recursion (MC error only),
and the deterministic samplers' exact affine map x_T -> x_0 against the exact probability-flow map, with
its order of convergence.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffusion_lab.processes.diffusion import GaussianDiffusion
from diffusion_lab.processes.schedules import make_schedule
from diffusion_lab.samplers import (
    GRIDS,
    SAMPLERS,
    NFECounter,
    ddim_sample,
    ddpm_sample,
    dpm_solver_sample,
    dynamic_thresholding,
    get_sampler,
    guided_model_output,
    make_grid,
    sample,
)

MU, S = 0.3, 0.5
SHAPE = (4096, 1, 4, 4)  # B = 4096 examples of D = 16 dims: N = 65536 independent scalars
N = math.prod(SHAPE)
SE_MEAN = S / math.sqrt(N)  # 0.00195
SE_STD = S / math.sqrt(2 * N)  # 0.00138
CONF = Path(__file__).resolve().parents[2] / "conf" / "sampler"

_DIFFUSIONS: dict[tuple, GaussianDiffusion] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tensors are small, and on a busy 2-core machine each 2-thread OpenMP
    region can wait milliseconds for the second thread (10x slower sampling loops)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def diffusion(
    schedule="linear", parameterization="eps", variance="fixed_small", T=1000, **kw
) -> GaussianDiffusion:
    key = (schedule, parameterization, variance, T, tuple(sorted(kw.items())))
    if key not in _DIFFUSIONS:
        _DIFFUSIONS[key] = GaussianDiffusion(
            make_schedule(schedule, T, **kw), parameterization=parameterization, variance=variance
        )
    return _DIFFUSIONS[key]


def oracle(d: GaussianDiffusion, mu: float = MU, s: float = S, var_out: float = 0.0):
    """model_fn(x_t, t, y) returning the ideal denoiser in d's parameterization (and variance channels)."""

    def model_fn(x_t, t, y=None):
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],)
        a = d.coef("sqrt_alphas_cumprod", t, x_t)
        sigma2 = 1.0 - d.coef("alphas_cumprod", t, x_t)
        x0 = mu + a * s**2 / (a**2 * s**2 + sigma2) * (x_t - a * mu)
        out = d.parameterization.target(x0, d.eps_from_x0(x_t, t, x0), t, d)
        if d.learned_variance:
            out = torch.cat([out, torch.full_like(out, var_out)], dim=1)
        return out

    return model_fn


def draw(d, sampler, steps, seed=0, shape=SHAPE, **kw):
    return sample(oracle(d), d, shape, sampler=sampler, steps=steps, seed=seed, clip_denoised=False, **kw)


# --------------------------------------------------------------------------- samples have mean mu, std s

# (sampler, steps, schedule, parameterization, variance, kwargs, slack_mean, slack_std); exact biases in
# the comments (mean bias where it is not ~0, then std bias)
MOMENT_CASES = [
    ("ddpm", None, "linear", "eps", "fixed_small", {}, 0.001, 0.005),  # bias std -0.0039
    ("ddpm", None, "cosine", "v", "fixed_small", {}, 0.001, 0.003),  # -0.0020
    ("ddpm", 100, "linear", "x0", "fixed_small", {}, 0.001, 0.035),  # -0.0321
    ("ddpm", 100, "cosine", "eps", "fixed_small", {}, 0.001, 0.020),  # -0.0177
    ("ddpm", 100, "cosine", "eps", "fixed_large", {}, 0.001, 0.006),  # +0.0046
    ("ddpm", 100, "cosine", "v", "learned_range", {}, 0.001, 0.009),  # -0.0071 (variance output v = 0)
    ("ddim", 50, "linear", "x0", "fixed_small", {"eta": 0.0}, 0.002, 0.030),  # -0.0009, -0.0281
    ("ddim", 50, "cosine", "eps", "fixed_small", {"eta": 0.0}, 0.001, 0.018),  # -0.0155
    ("ddim", 50, "cosine", "v", "fixed_small", {"eta": 1.0}, 0.001, 0.036),  # -0.0328
    ("dpm_solver", 20, "linear", "eps", "fixed_small", {}, 0.002, 0.010),  # -0.0010, +0.0073
    ("dpm_solver", 20, "linear", "x0", "fixed_small", {}, 0.002, 0.010),
    ("dpm_solver", 20, "linear", "v", "fixed_small", {}, 0.002, 0.010),
    ("dpm_solver", 20, "cosine", "eps", "fixed_small", {}, 0.001, 0.018),  # +0.0150
    ("dpm_solver", 10, "linear", "v", "fixed_small", {}, 0.002, 0.019),  # -0.0010, +0.0159
    ("dpm_solver", 10, "cosine", "eps", "fixed_small", {}, 0.001, 0.009),  # -0.0063
    ("dpm_solver", 20, "cosine", "x0", "fixed_small", {"grid": "time_uniform"}, 0.001, 0.004),  # -0.0019
]


@pytest.mark.parametrize(
    "sampler, steps, schedule, param, variance, kw, slack_mean, slack_std",
    MOMENT_CASES,
    ids=[
        f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-{c[4]}-{'-'.join(f'{k}{v}' for k, v in c[5].items())}"
        for c in MOMENT_CASES
    ],
)
def test_samples_have_data_mean_and_std(sampler, steps, schedule, param, variance, kw, slack_mean, slack_std):
    d = diffusion(schedule, param, variance)
    x = draw(d, sampler, steps, **kw)
    assert x.shape == SHAPE and torch.isfinite(x).all()
    mean_err, std_err = x.mean().item() - MU, x.std().item() - S
    tol_mean, tol_std = 4 * SE_MEAN + slack_mean, 4 * SE_STD + slack_std
    assert abs(mean_err) <= tol_mean, f"mean off by {mean_err:+.5f} > {tol_mean:.5f}"
    assert abs(std_err) <= tol_std, f"std off by {std_err:+.5f} > {tol_std:.5f}"


# ------------------------------------------------- stochastic samplers: sample moments = exact recursion


def exact_moments(
    d: GaussianDiffusion, steps, kind: str, eta: float = 0.0, grid: str = "uniform"
) -> tuple[float, float]:
    """Mean and std of the sampler's output, by the float64 moment recursion m' = A m + b, v' = A^2 v + var.

    Written from the papers, independently of the samplers: with x0_hat = g x + (1 - g a) mu each step is
    affine in x plus Gaussian noise.
        DDPM (Eq. 7):  x' = c1 x0_hat + c2 x + sqrt(var) z,  var = beta_tilde | beta | sqrt(beta beta_tilde)
        DDIM (Eq. 12): x' = sqrt(ab') x0_hat + sqrt(1 - ab' - sig^2) (x - a x0_hat) / sigma + sig z  (Eq. 16)
    """
    ab_all = d.schedule.alphas_cumprod
    ab = ab_all[make_grid(grid, d, steps).flip(0)].tolist()  # the kept alpha-bars, ascending in t
    m, v = 0.0, 1.0
    for k in reversed(range(len(ab))):
        a_bar, a_prev = ab[k], (ab[k - 1] if k > 0 else 1.0)
        a, sigma = math.sqrt(a_bar), math.sqrt(1.0 - a_bar)
        g = a * S**2 / (a_bar * S**2 + sigma**2)
        beta = 1.0 - a_bar / a_prev
        beta_tilde = beta * (1.0 - a_prev) / (1.0 - a_bar)
        if kind == "ddim":
            sig2 = eta**2 * beta_tilde
            direction = math.sqrt(1.0 - a_prev - sig2)
            c_x0, c_x, var = math.sqrt(a_prev) - direction * a / sigma, direction / sigma, sig2
        else:
            c_x0 = math.sqrt(a_prev) * beta / (1.0 - a_bar)
            c_x = math.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a_bar)
            var = {
                "fixed_small": beta_tilde,
                "fixed_large": beta,
                "learned_range": math.sqrt(beta * beta_tilde),
            }[kind]
        if k == 0:
            var = 0.0
        A, b = c_x0 * g + c_x, c_x0 * (1.0 - g * a) * MU
        m, v = A * m + b, A * A * v + var
    return m, math.sqrt(v)


@pytest.mark.parametrize(
    "sampler, steps, schedule, param, variance, kw",
    [
        ("ddpm", 50, "linear", "eps", "fixed_small", {}),
        ("ddpm", 50, "linear", "v", "fixed_large", {}),
        ("ddpm", 50, "cosine", "x0", "learned_range", {}),
        ("ddim", 50, "cosine", "eps", "fixed_small", {"eta": 0.5}),
        ("ddim", 25, "linear", "v", "fixed_small", {"eta": 1.0}),
        # non-uniform grids: the respaced chain (betas rebuilt from the kept alpha-bars) is the same Markov
        # chain the recursion builds from those alpha-bars
        ("ddpm", 20, "linear", "eps", "fixed_small", {"grid": "karras"}),
        ("ddpm", 20, "cosine", "v", "fixed_large", {"grid": "logsnr_uniform"}),
        ("ddim", 20, "linear", "x0", "fixed_small", {"eta": 0.5, "grid": "trailing"}),
        ("ddim", 20, "cosine", "eps", "fixed_small", {"eta": 1.0, "grid": "leading"}),
    ],
)
def test_stochastic_samples_match_exact_moment_recursion(sampler, steps, schedule, param, variance, kw):
    d = diffusion(schedule, param, variance)
    kind = "ddim" if sampler == "ddim" else variance
    m, s = exact_moments(d, steps, kind, kw.get("eta", 0.0), kw.get("grid", "uniform"))
    x = draw(d, sampler, steps, seed=1, **kw)
    # 4 standard errors (of the predicted std) + 1e-3 for float32 tables
    assert abs(x.mean().item() - m) <= 4 * s / math.sqrt(N) + 1e-3, (x.mean().item(), m)
    assert abs(x.std().item() - s) <= 4 * s / math.sqrt(2 * N) + 1e-3, (x.std().item(), s)


# --------------------------------------------- deterministic samplers: exact map and order of convergence


def affine_map(fn, d, steps, **kw) -> tuple[float, float]:
    """(A, b) of the deterministic sampler's map x_T -> x_0 = A x_T + b under the oracle (it is affine)."""
    x_T = torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1)
    x = fn(oracle(d), d, x_T, steps, clip_denoised=False, **kw).double().flatten()
    return (x[1] - x[0]).item(), x[0].item()


def flow_map(d) -> tuple[float, float]:
    """The exact probability-flow map from x_T ~ N(0, 1) to N(mu, s^2): matches the marginal at T."""
    ab_T = float(d.schedule.alphas_cumprod[-1])
    A = S / math.sqrt(ab_T * S**2 + 1.0 - ab_T)
    return A, MU - A * math.sqrt(ab_T) * MU


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_is_first_order_dpm_solver_second_order(schedule):
    d = diffusion(schedule, "eps")
    A_star, b_star = flow_map(d)

    def err(fn, n, **kw):
        A, b = affine_map(fn, d, n, **kw)
        assert abs(b - b_star) < 5e-4
        return abs(A - A_star)

    e_ddim = [err(ddim_sample, n, eta=0.0) for n in (50, 100)]
    assert 1.7 < e_ddim[0] / e_ddim[1] < 2.3, e_ddim  # observed 1.98 / 2.00
    e_dpm = [err(dpm_solver_sample, n) for n in (25, 50, 100)]
    assert e_dpm[0] > e_dpm[1] > e_dpm[2]
    assert e_dpm[1] / e_dpm[2] > 3.0, e_dpm  # second order: 4; observed 5.8 / 4.1
    assert e_dpm[1] < 0.2 * e_ddim[0]  # same NFE, far more accurate
    assert err(dpm_solver_sample, 100, grid="time_uniform") < 1e-3


def test_dpm_solver_order_one_is_ddim_eta_zero():
    d = diffusion("cosine", "v").respace(make_grid("uniform", diffusion("cosine", "v"), 30).tolist())
    x_T = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = ddim_sample(oracle(diffusion("cosine", "v")), d, x_T, clip_denoised=False, eta=0.0)
    b = dpm_solver_sample(oracle(diffusion("cosine", "v")), d, x_T, clip_denoised=False, order=1)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------- exact equalities


def test_same_seed_same_samples_and_different_seed_differs():
    d = diffusion("linear", "eps")
    for name, kw in [("ddpm", {}), ("ddim", {"eta": 1.0}), ("dpm_solver", {})]:
        a = draw(d, name, 20, seed=3, shape=(8, 1, 4, 4), **kw)
        b = draw(d, name, 20, seed=3, shape=(8, 1, 4, 4), **kw)
        c = draw(d, name, 20, seed=4, shape=(8, 1, 4, 4), **kw)
        assert torch.equal(a, b), name
        assert not torch.allclose(a, c), name


def test_respaced_all_steps_equals_plain_ddpm():
    d = diffusion("cosine", "eps")
    full = d.respace(range(d.num_timesteps))
    x_T = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = ddpm_sample(oracle(d), d, x_T, generator=torch.Generator().manual_seed(1), clip_denoised=False)
    b = ddpm_sample(oracle(d), full, x_T, generator=torch.Generator().manual_seed(1), clip_denoised=False)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # steps=T is the same as steps=None
    c = ddpm_sample(
        oracle(d), d, x_T, d.num_timesteps, generator=torch.Generator().manual_seed(1), clip_denoised=False
    )
    assert torch.equal(a, c)


@pytest.mark.parametrize("steps", [None, 40])
def test_ddim_eta_one_equals_ddpm_fixed_small(steps):
    d = diffusion("linear", "eps")
    x_T = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = ddpm_sample(oracle(d), d, x_T, steps, generator=torch.Generator().manual_seed(1), clip_denoised=False)
    b = ddim_sample(
        oracle(d), d, x_T, steps, generator=torch.Generator().manual_seed(1), clip_denoised=False, eta=1.0
    )
    torch.testing.assert_close(a, b, atol=2e-4, rtol=0)  # same noise; float32 tables computed two ways


# ------------------------------------------------------------------------------------- learned variance


def test_learned_variance_paths_run_and_use_the_variance_channels():
    d = diffusion("cosine", "eps", "learned_range")
    x_T = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    outs = []
    for v in (-1.0, 0.0, 1.0):  # fixed_small, midpoint, fixed_large in Improved DDPM Eq. 15
        g = torch.Generator().manual_seed(1)
        outs.append(ddpm_sample(oracle(d, var_out=v), d, x_T, 20, generator=g, clip_denoised=False))
    assert all(torch.isfinite(o).all() for o in outs)
    assert not torch.allclose(outs[0], outs[2])
    # v = -1 is fixed_small, v = +1 fixed_large (same noise, same chain)
    for v, var in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
        g = torch.Generator().manual_seed(1)
        ref = ddpm_sample(
            oracle(diffusion("cosine", "eps", var)),
            diffusion("cosine", "eps", var),
            x_T,
            20,
            generator=g,
            clip_denoised=False,
        )
        torch.testing.assert_close(outs[0 if v < 0 else 2], ref, atol=1e-5, rtol=1e-5)
    # DDIM and DPM-Solver ignore the variance channels
    dl = diffusion("cosine", "eps", "learned")
    for fn in (ddim_sample, dpm_solver_sample):
        a = fn(oracle(dl, var_out=-3.0), dl, x_T, 10, clip_denoised=False)
        b = fn(oracle(diffusion("cosine", "eps")), diffusion("cosine", "eps"), x_T, 10, clip_denoised=False)
        torch.testing.assert_close(a, b)
    assert torch.isfinite(ddpm_sample(oracle(dl, var_out=-3.0), dl, x_T, 10)).all()


# ------------------------------------------------------------------------ classifier-free guidance


class ClassOracle:
    """A class-conditional oracle: class c has mean MUS[c]; y = None or y = num_classes is the null class."""

    MUS = (-0.5, 0.5)

    def __init__(self, d: GaussianDiffusion, num_classes: int | None = 2, var_channels: bool = False):
        self.d, self.num_classes, self.var_channels, self.calls = d, num_classes, var_channels, []

    def __call__(self, x_t, t, y=None):
        self.calls.append(x_t.shape[0])
        mu = torch.zeros(x_t.shape[0])
        if y is not None:
            for c, m in enumerate(self.MUS):
                mu = torch.where(y == c, torch.tensor(m), mu)
        mu = mu.reshape(-1, 1, 1, 1)
        out = oracle(self.d, mu=mu)(x_t, t)
        if self.var_channels:  # the variance output says which half it came from
            out = torch.cat([out, (mu != 0).float().expand_as(out)], 1)
        return out


@pytest.mark.parametrize("batched", [True, False])
def test_guidance_formula_and_batching(batched):
    d = diffusion("linear", "eps", "learned_range")
    model = ClassOracle(d, num_classes=2 if batched else None, var_channels=True)
    x = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.full((6,), 500)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    out = guided_model_output(model, d, x, t, y, guidance_scale=3.0)
    assert model.calls == ([12] if batched else [6, 6])  # one 2B forward when the null label is known
    cond, uncond = model(x, t, y), model(x, t, None)
    torch.testing.assert_close(out[:, :1], uncond[:, :1] + 3.0 * (cond[:, :1] - uncond[:, :1]))
    torch.testing.assert_close(out[:, 1:], cond[:, 1:])  # variance from the conditional half
    # an explicit null_class overrides the attribute
    model.num_classes = None
    model.calls.clear()
    guided_model_output(model, d, x, t, y, guidance_scale=3.0, null_class=2)
    assert model.calls == [12]


def test_guidance_scale_one_is_unguided_and_zero_is_unconditional():
    d = diffusion("cosine", "eps")
    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1] * 4)
    for fn in (ddim_sample, dpm_solver_sample):
        model = NFECounter(ClassOracle(d))
        guided1 = fn(model, d, x_T, 10, y=y, guidance_scale=1.0, clip_denoised=False)
        assert model.nfe == 10
        plain = fn(ClassOracle(d), d, x_T, 10, y=y, clip_denoised=False)
        assert torch.equal(guided1, plain)
        guided0 = fn(ClassOracle(d), d, x_T, 10, y=y, guidance_scale=0.0, clip_denoised=False)
        uncond = fn(ClassOracle(d), d, x_T, 10, y=None, clip_denoised=False)
        torch.testing.assert_close(guided0, uncond, atol=1e-5, rtol=1e-5)
        # scale > 1 pushes each class past its conditional mean, away from the null mean 0
        guided3 = fn(ClassOracle(d), d, x_T, 10, y=y, guidance_scale=3.0, clip_denoised=False)
        sign = torch.tensor([-1.0, 1.0] * 4).reshape(-1, 1, 1, 1)
        assert ((guided3 - plain) * sign).mean() > 0.1


# ---------------------------------------------------------------------- clipping and dynamic thresholding


def test_dynamic_thresholding_function():
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x[0] *= 0.2  # in range: left alone (s = max(1, quantile) = 1)
    x[1:] *= torch.tensor([2.0, 5.0, 50.0]).reshape(3, 1, 1, 1)
    out = dynamic_thresholding(x, 0.995)
    assert out.abs().max() <= 1.0 + 1e-6
    torch.testing.assert_close(out[0], x[0])
    for i in (1, 2, 3):  # per example: s = quantile(|x_i|), out = clamp(x_i, -s, s) / s
        s = torch.quantile(x[i].abs().flatten(), 0.995)
        torch.testing.assert_close(out[i], x[i].clamp(-s, s) / s)
        assert (out[i].abs() >= 1 - 1e-6).float().mean() <= 0.01  # only the top 0.5% saturate
    with pytest.raises(ValueError, match="percentile"):
        dynamic_thresholding(x, 99.5)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("mode", ["clip", "dynamic"])
def test_x0_clipping_and_dynamic_thresholding_bound_predictions(sampler, mode):
    d = diffusion("linear", "eps")
    model = oracle(d, mu=0.5, s=2.0)  # data far outside [-1, 1]
    seen = []
    kw = {"clip_denoised": mode == "clip", "dynamic_threshold": 0.995 if mode == "dynamic" else None}
    x = sample(
        model, d, (16, 1, 4, 4), sampler=sampler, steps=10, seed=0, callback=lambda *a: seen.append(a), **kw
    )
    assert len(seen) == 10
    assert all(p.abs().max() <= 1.0 + 1e-5 for *_, p in seen)
    assert x.abs().max() <= 1.0 + 1e-5
    unclipped = sample(model, d, (16, 1, 4, 4), sampler=sampler, steps=10, seed=0, clip_denoised=False)
    assert unclipped.abs().max() > 1.5


# ---------------------------------------------------------------------------- steps, NFE, callback, API


@pytest.mark.parametrize(
    "sampler, steps, nfe, first_t",
    [
        ("ddpm", None, 50, 49),
        ("ddpm", 7, 7, 49),
        ("ddim", "ddim10", 10, 45),  # DDIM's stride: 0, 5, ..., 45
        ("ddim", 13, 13, 49),
        ("dpm_solver", 12, 12, 49),
        ("dpm_solver", None, 50, 49),
    ],
)
@pytest.mark.filterwarnings("ignore:steps='ddim10' is DDIM's strided grid")
def test_nfe_and_callback(sampler, steps, nfe, first_t):
    d = diffusion("cosine", "v", T=50)
    calls = []
    x, n = sample(
        oracle(d),
        d,
        (2, 1, 4, 4),
        sampler=sampler,
        steps=steps,
        seed=0,
        return_nfe=True,
        callback=lambda i, t, x_t, x0: calls.append((i, t, x_t.shape, x0.shape)),
    )
    assert n == nfe and len(calls) == nfe
    assert [c[0] for c in calls] == list(range(nfe))
    ts = [c[1] for c in calls]
    assert (
        ts[0] == first_t and ts == sorted(ts, reverse=True) and len(set(ts)) == nfe
    )  # original training steps
    assert all(c[2] == c[3] == (2, 1, 4, 4) for c in calls)


# ----------------------------------------------------------------------------------- timestep grids


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sampler_visits_exactly_the_grid_steps(sampler, grid):
    """The callback's t (the training step the network saw) runs through make_grid(grid, ...) in order."""
    d = diffusion("cosine", "v", T=50)
    for steps, opts in ((7, {}), (1, {}), (20, {"rho": 3.0} if grid == "karras" else {})):
        if sampler in ("euler", "heun") and grid == "karras":  # their default range is EDM's, up to 80
            opts = {"sigma_max": 80.0, **opts}
        seen: list[int] = []
        record = seen.append
        x, nfe = sample(
            oracle(d),
            d,
            (2, 1, 4, 4),
            sampler=sampler,
            steps=steps,
            grid=grid,
            grid_opts=opts,
            return_nfe=True,
            callback=lambda i, t, x_t, x0, record=record: record(t),
        )
        nfe_per_grid = 2 * steps - 1 if sampler == "heun" else steps  # Heun: 2 per step, 1 on the last
        assert seen == make_grid(grid, d, steps, **opts).tolist() and nfe == nfe_per_grid
        assert torch.isfinite(x).all()
    if grid == "leading":  # its option reaches the grid
        seen = []
        sample(
            oracle(d),
            d,
            (2, 1, 4, 4),
            sampler,
            5,
            grid=grid,
            grid_opts={"steps_offset": 1},
            callback=lambda i, t, *a: seen.append(t),
        )
        assert seen == [41, 31, 21, 11, 1]


def test_respacing_to_a_grid_keeps_its_alpha_bars():
    """Improved DDPM Sec. 4 for any kept subset: the respaced chain has alpha_bar_t at the grid's steps."""
    from diffusion_lab.samplers import resolve_steps

    d = diffusion("linear", "eps")
    for grid in GRIDS:
        keep = make_grid(grid, d, 15).flip(0)
        r = resolve_steps(d, 15, grid)
        assert r.timestep_map.tolist() == keep.tolist()
        torch.testing.assert_close(r.alphas_cumprod, d.alphas_cumprod[keep])
    assert resolve_steps(d, None, "karras") is d


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_converges_on_every_grid(sampler, grid):
    """At 100 steps every sampler x grid gives mean mu and std s within its discretisation bias.

    Exact biases at 100 steps on this schedule (std; mean about -0.001 for all): DDPM -0.023 to -0.032,
    DDIM -0.012 to -0.015, DPM-Solver++(2M) within +-0.007 (largest on the grids that keep step 0, whose
    last 2M step extrapolates), Euler -0.013 to -0.016, Heun within +-0.003; at 25 steps they are 3-10x
    larger.
    """
    d = diffusion("linear", "eps")
    x = draw(d, sampler, 100, grid=grid)
    slack = {"ddpm": 0.035, "ddim": 0.018, "dpm_solver": 0.009, "euler": 0.018, "heun": 0.009}[sampler]
    assert abs(x.mean().item() - MU) <= 4 * SE_MEAN + 0.002
    assert abs(x.std().item() - S) <= 4 * SE_STD + slack, x.std().item() - S


def test_ddim_n_steps_string_is_the_leading_grid():
    d = diffusion("cosine", "v", T=50)
    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="grid=leading sampler.steps=10"):
        a = ddim_sample(oracle(d), d, x_T, "ddim10", clip_denoised=False)
    b = ddim_sample(oracle(d), d, x_T, 10, grid="leading", clip_denoised=False)
    assert torch.equal(a, b)


def test_zero_terminal_snr_v_prediction_stays_finite():
    """alpha_bar_T = 0 (Lin et al. 2024): lambda_T = -inf for DPM-Solver, a = 0 for the oracle."""
    d = diffusion("linear", "v", zero_terminal_snr=True)
    n = 512 * 16
    for name in SAMPLERS:
        x = draw(d, name, 20, shape=(512, 1, 4, 4))
        assert torch.isfinite(x).all(), name
        if name == "ddpm":  # against the exact recursion: 4 standard errors + 1e-3
            m, s = exact_moments(d, 20, "fixed_small")
            assert abs(x.mean().item() - m) < 4 * s / math.sqrt(n) + 1e-3
            assert abs(x.std().item() - s) < 4 * s / math.sqrt(2 * n) + 1e-3
        else:  # DDIM 20 steps: std bias about -0.07; DPM-Solver++ about +0.01
            assert abs(x.std().item() - S) < 0.09 and abs(x.mean().item() - MU) < 0.03, name


def test_bad_arguments_raise_clear_errors():
    d = diffusion("linear", "eps", T=50)
    x_T = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("lms")
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(oracle(d), d, x_T, 5, eta=2.0)
    with pytest.raises(ValueError, match="steps"):
        ddpm_sample(oracle(d), d, x_T, 500)
    with pytest.raises(ValueError, match="order"):
        dpm_solver_sample(oracle(d), d, x_T, 5, order=3)
    with pytest.raises(ValueError, match="x_T"):
        ddpm_sample(oracle(d), d, torch.zeros(4, dtype=torch.long), 5)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm_solver"])
def test_sampler_configs_instantiate(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    fn = instantiate(cfg)
    assert fn.func is SAMPLERS[name]
    assert fn.keywords["clip_denoised"] is True and fn.keywords["guidance_scale"] == 1.0
    assert fn.keywords["steps"] == {"ddpm": None, "ddim": 50, "dpm_solver": 20}[name]
    # defaults that keep each sampler's earlier steps
    assert fn.keywords["grid"] == {"ddpm": "uniform", "ddim": "uniform", "dpm_solver": "logsnr_uniform"}[name]
    d = diffusion("cosine", "eps", T=100)
    counter = NFECounter(oracle(d))
    x = fn(counter, d, torch.randn(2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 4, 4) and torch.isfinite(x).all()
    assert counter.nfe == {"ddpm": 100, "ddim": 50, "dpm_solver": 20}[name]
    # the grid and its options from the config (as sampler.grid=karras sampler.grid_opts.rho=3 would set)
    cfg.steps, cfg.grid, cfg.grid_opts = 8, "karras", {"rho": 3.0}
    seen = []
    instantiate(cfg)(oracle(d), d, torch.randn(2, 1, 4, 4), callback=lambda i, t, *a: seen.append(t))
    assert seen == make_grid("karras", d, 8, rho=3.0).tolist()
    cfg.grid = "quadratic"
    with pytest.raises(ValueError, match="unknown grid 'quadratic'"):
        instantiate(cfg)(oracle(d), d, torch.randn(2, 1, 4, 4))


@pytest.mark.parametrize("n,k", [(100, 10), (180, 36), (1000, 36), (20, 36)])
def test_sample_grid_of_a_conditional_model_has_one_column_per_class(n, k):
    """`sample` cycles the labels 0..K-1; the grid keeps whole rows of K, so column c shows class c."""
    from diffusion_lab.sample import grid_layout

    shown, nrow = grid_layout(n, k)
    labels = torch.arange(n) % k
    assert nrow == k and shown <= max(256, k) and shown == min(n, shown)
    if n >= k:
        assert shown % k == 0 and shown >= k
        columns = labels[:shown].view(-1, k)
        assert torch.equal(columns, torch.arange(k).expand_as(columns))
    assert grid_layout(n, None) == (min(n, 256), None)


@pytest.mark.parametrize(
    "sampler,key",
    [
        ({"steps": 5000, "grid": "uniform"}, "sampler.steps=5000"),
        ({"steps": 0, "grid": "uniform"}, "sampler.steps=0"),
        ({"steps": 10, "grid": "unifrom"}, "sampler.grid='unifrom'"),
        ({"steps": 10, "grid": "karras", "grid_opts": {"rhoo": 5}}, "sampler.grid_opts={'rhoo': 5}"),
    ],
)
def test_sample_command_names_the_bad_sampler_key(sampler, key):
    """`sample` refuses a bad sampler config before writing anything, naming the key at fault."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from diffusion_lab.sample import check_sampler

    module = SimpleNamespace(
        diffusion=GaussianDiffusion(make_schedule("linear", timesteps=100)),
        hparams=SimpleNamespace(num_classes=10, class_conditional=False),
    )
    with pytest.raises(ValueError) as err:
        check_sampler(OmegaConf.create({"sampler": sampler, "label": None}), module)
    assert str(err.value).startswith(key + " is not valid"), str(err.value)
