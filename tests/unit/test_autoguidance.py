"""Autoguidance (Karras et al. 2024b) as a wrapper of the network output, against closed forms."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.processes.diffusion import GaussianDiffusion
from diffusion_lab.processes.schedules import make_schedule
from diffusion_lab.samplers import ddim_sample, sample
from diffusion_lab.samplers.common import guided_model_output
from diffusion_lab.samplers.guidance import AutoGuidance, check_guide


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def exact_model(d: GaussianDiffusion, var: float, mean_per_class: float = 0.0):
    """model_fn(x_t, t, y) of the exact denoiser for data N(m_y, var) per pixel, in d's parameterization
    (m_y = mean_per_class * y for labels y, 0 without), with a = sqrt(alpha_bar_t):

        E[x_0 | x_t] = m + a var / (a^2 var + 1 - a^2) (x_t - a m)
    """

    def model_fn(x_t, t, y=None):
        a = d.coef("sqrt_alphas_cumprod", t, x_t)
        m = 0.0 if y is None else (mean_per_class * y.to(x_t.dtype)).reshape(-1, *([1] * (x_t.ndim - 1)))
        x0 = m + a * var / (a**2 * var + 1.0 - a**2) * (x_t - a * m)
        out = d.parameterization.target(x0, d.eps_from_x0(x_t, t, x0), t, d)
        if d.learned_variance:
            out = torch.cat([out, torch.full_like(out, 0.3 if var > 0.1 else -0.3)], dim=1)
        return out

    return model_fn


@pytest.mark.parametrize(("parameterization", "w"), [("eps", 2.0), ("v", 3.0), ("x0", 0.5)])
def test_autoguided_ode_variance_matches_closed_form(parameterization, w):
    """Data N(0, a) per pixel; main model the exact denoiser of N(0, a), guide that of N(0, b).

    Derivation. In EDM's coordinates x = x_t / sqrt(alpha_bar), sigma^2 = (1 - alpha_bar) / alpha_bar, the
    exact denoiser of N(0, a) is D_a(x; sigma) = a / (a + sigma^2) x, so the autoguided one is linear too:

        D(x; sigma) = D_b + w (D_a - D_b) = k(sigma) x,   k = w a / (a + sigma^2) + (1 - w) b / (b + sigma^2).

    The probability-flow ODE (Karras et al. 2022, Eq. 1 with sigma(t) = t) dx / d sigma = (x - D) / sigma
    then reads d ln x / d sigma = (1 - k) / sigma = w sigma / (a + sigma^2) + (1 - w) sigma / (b + sigma^2),
    and integrating from sigma = S down to 0,

        x(0) = x(S) (a / (a + S^2))^(w/2) (b / (b + S^2))^((1 - w)/2).

    The sampler starts from x_T ~ N(0, I), i.e. x(S) = sqrt(1 + S^2) x_T with S = sigma of the first step, so

        Var[x_0] = (1 + S^2) (a / (a + S^2))^w (b / (b + S^2))^(1 - w)   (-> a^w b^(1 - w) as S -> inf).

    DDIM with eta = 0 is Euler's method for this ODE (Karras et al. 2022, Sec. 4), so on all 1,000 steps it
    matches to O(1 / steps) (measured: -0.4 % at w = 2 and 3, -0.8 % at w = 0.5). The map x_T -> x_0 is
    linear, so x_0 = c x_T exactly and Var = c^2.
    """
    a, b = 0.25, 0.09
    d = GaussianDiffusion(make_schedule("linear", 1000), parameterization=parameterization)
    guided = AutoGuidance(exact_model(d, a), exact_model(d, b), w)
    x_T = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = ddim_sample(guided, d, x_T, eta=0.0, clip_denoised=False)
    c = float((x0 * x_T).sum() / (x_T * x_T).sum())
    assert torch.allclose(x0, c * x_T, rtol=1e-4, atol=1e-6)  # linear in x_T
    ab = float(d.alphas_cumprod[-1])
    S2 = (1 - ab) / ab
    expected = (1 + S2) * (a / (a + S2)) ** w * (b / (b + S2)) ** (1 - w)
    assert c**2 == pytest.approx(expected, rel=0.01)
    assert expected == pytest.approx(a**w * b ** (1 - w), rel=0.01)  # S is large here


def test_weight_one_is_unguided_sampling_exactly():
    """w = 1: the stochastic DDPM sampler from the same seed gives bitwise the unguided samples."""
    d = GaussianDiffusion(make_schedule("linear", 50), parameterization="eps")
    main, guide = exact_model(d, 0.25), exact_model(d, 0.01)
    plain = sample(main, d, (3, 1, 4, 4), sampler="ddpm", seed=5)
    guided = sample(AutoGuidance(main, guide, 1.0), d, (3, 1, 4, 4), sampler="ddpm", seed=5)
    assert torch.equal(plain, guided)
    other = sample(AutoGuidance(main, guide, 1.5), d, (3, 1, 4, 4), sampler="ddpm", seed=5)
    assert not torch.allclose(plain, other)


def test_learned_variance_channels_come_from_the_main_model():
    d = GaussianDiffusion(make_schedule("linear", 50), parameterization="eps", variance="learned_range")
    main, guide = exact_model(d, 0.25), exact_model(d, 0.01)
    x, t = torch.randn(2, 1, 3, 3), torch.tensor([10, 40])
    out = AutoGuidance(main, guide, 2.0)(x, t)
    m, g = main(x, t), guide(x, t)
    assert torch.equal(out[:, 1:], m[:, 1:])
    assert torch.allclose(out[:, :1], g[:, :1] + 2.0 * (m[:, :1] - g[:, :1]))


def test_composes_with_class_labels_and_classifier_free_guidance():
    """Both networks see the labels (the null class for the unconditional half of CFG): CFG with scale s over
    autoguided outputs equals the formula applied to the four raw outputs."""
    d = GaussianDiffusion(make_schedule("linear", 50), parameterization="eps")
    main, guide = exact_model(d, 0.25, mean_per_class=0.1), exact_model(d, 0.09, mean_per_class=0.05)
    auto = AutoGuidance(main, guide, 2.0)
    x, t, y = torch.randn(3, 1, 2, 2), torch.tensor([5, 20, 45]), torch.tensor([1, 2, 3])
    null = torch.full_like(y, 10)
    out = guided_model_output(auto, d, x, t, y, guidance_scale=3.0, null_class=10)
    ag = lambda labels: guide(x, t, labels) + 2.0 * (main(x, t, labels) - guide(x, t, labels))  # noqa: E731
    assert torch.allclose(out, ag(null) + 3.0 * (ag(y) - ag(null)), atol=1e-6)
    assert not torch.allclose(ag(y), ag(null))  # the labels matter


def _cfg(**over):
    cfg = {
        "dataset": {"name": "persian", "image_size": 32, "channels": 1},
        "class_conditional": False,
        "objective": {
            "_target_": "diffusion_lab.processes.diffusion.GaussianDiffusion",
            "parameterization": "eps",
        },
        "schedule": {"_target_": "x", "name": "linear", "timesteps": 1000},
        "model": {"base_channels": 64},
    }
    for key, value in over.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def test_check_guide_accepts_a_smaller_model_and_refuses_other_data_or_diffusion():
    shape = (1, 32, 32)
    check_guide(_cfg(), shape, 10, _cfg(**{"model.base_channels": 32}), shape, 10)  # another architecture
    cases = [
        (_cfg(**{"dataset.image_size": 16}), (1, 16, 16), "image shape"),
        (_cfg(**{"dataset.name": "persian_letters"}), shape, "dataset.name"),
        (_cfg(**{"objective.parameterization": "v"}), shape, "objective.parameterization"),
        (_cfg(**{"schedule.name": "cosine"}), shape, "schedule"),
    ]
    for guide_cfg, guide_shape, named in cases:
        with pytest.raises(ValueError, match=named) as e:
            check_guide(_cfg(), shape, 10, guide_cfg, guide_shape, 10, guide_path="g.ckpt")
        assert "\n" not in str(e.value) and "g.ckpt" in str(e.value)
