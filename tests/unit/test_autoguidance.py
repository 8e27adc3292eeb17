"""Autoguidance (Karras et al. 2024b) as a wrapper of the network output, against closed forms."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from diffusion_lab.processes.diffusion import GaussianDiffusion
from diffusion_lab.processes.schedules import make_schedule
from diffusion_lab.samplers import ddim_sample, sample
from diffusion_lab.samplers.common import guided_model_output
from diffusion_lab.samplers.guidance import AutoGuidance, check_guide, guide_settings
from diffusion_lab.train import CONF_DIR


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


@functools.cache
def _composed(overrides: tuple[str, ...]) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    out = {k: OmegaConf.to_container(cfg[k]) for k in ("model", "schedule", "objective")}
    dataset = {k: v for k, v in OmegaConf.to_container(cfg.dataset).items() if k != "cache_dir"}
    return {**out, "dataset": dataset, "class_conditional": bool(cfg.class_conditional)}


def run_config(*overrides: str) -> dict:
    """The parts of a resolved run config that a checkpoint stores and ``check_guide`` reads, composed from
    conf/ (the launch-time groups need Hydra's runtime and are left out)."""
    return copy.deepcopy(_composed(overrides))


SHAPE = (1, 16, 16)


def refusal(main: dict, guide: dict, guide_shape=SHAPE) -> list[str]:
    """The differences that ``check_guide`` names, in order, from its one-line message."""
    with pytest.raises(ValueError) as e:
        check_guide(main, SHAPE, 10, guide, guide_shape, 10, guide_path="g.ckpt")
    message = str(e.value)
    head, tail = "guide g.ckpt does not fit the model (guide vs model): ", "; autoguidance needs a guide of"
    assert "\n" not in message and message.startswith(head) and tail in message
    return message[len(head) : message.index(tail)].split("; ")


def test_check_guide_accepts_a_smaller_model_and_refuses_other_data_or_diffusion():
    main = run_config("model=unet_tiny")
    check_guide(main, SHAPE, 10, run_config("model=mlp", "model.hidden_dim=32"), SHAPE, 10)  # architecture
    check_guide(main, SHAPE, 10, run_config("objective.loss_weighting=min_snr"), SHAPE, 10)  # the loss
    hybrid, vlb = run_config("objective=hybrid"), run_config("objective=vlb")
    check_guide(hybrid, SHAPE, 10, vlb, SHAPE, 10)  # another loss
    cases = [
        (
            run_config("dataset.image_size=8"),
            (1, 8, 8),
            ["image shape (1, 8, 8) vs (1, 16, 16)", "dataset.image_size 8 vs 16"],
        ),
        (
            run_config("dataset=persian", "dataset.image_size=16"),
            SHAPE,
            ["dataset.name 'persian' vs 'digits'"],
        ),
        (run_config("objective=v"), SHAPE, ["objective.parameterization 'v' vs 'eps'"]),
        (run_config("objective=hybrid"), SHAPE, ["objective.variance 'learned_range' vs 'fixed_small'"]),
        (
            run_config("schedule=cosine"),
            SHAPE,
            [  # the model's settings first, then the guide's own
                "schedule.beta_end None vs 0.02",
                "schedule.beta_start None vs 0.0001",
                "schedule.name 'cosine' vs 'linear'",
                "schedule.max_beta 0.999 vs None",
                "schedule.s 0.008 vs None",
            ],
        ),
        (run_config("schedule.timesteps=500"), SHAPE, ["schedule.timesteps 500 vs 1000"]),
        (
            run_config("objective=edm"),
            SHAPE,
            [
                "objective._target_ 'diffusion_lab.processes.edm.EDMDiffusion' vs "
                "'diffusion_lab.processes.diffusion.GaussianDiffusion'"
            ],
        ),
    ]
    for guide, guide_shape, named in cases:
        assert refusal(main, guide, guide_shape) == named


FLOW_MEANING = [
    ("objective.path=gvp", "objective.path 'gvp' vs 'linear'"),
    ("objective.prediction=noise", "objective.prediction 'eps' vs 'velocity'"),  # noise is eps-prediction
    ("objective.prediction=score", "objective.prediction 'score' vs 'velocity'"),
    ("objective.time_scale=1.0", "objective.time_scale 1.0 vs 1000.0"),
]


@pytest.mark.parametrize(("override", "named"), FLOW_MEANING)
@pytest.mark.parametrize("objective", ["flow", "interpolant"])
def test_a_flow_guide_whose_output_means_something_else_is_refused(objective, override, named):
    """Another path, prediction or time scale: the same output is another quantity, or at another time."""
    main = run_config(f"objective={objective}")
    assert refusal(main, run_config(f"objective={objective}", override)) == [named]


def test_a_flow_guide_differing_in_everything_that_changes_its_meaning_is_named_for_each():
    meaning = [case for case in FLOW_MEANING if "score" not in case[0]]
    guide = run_config("objective=flow", "schedule=cosine", *(o for o, _ in meaning))
    assert refusal(run_config("objective=flow"), guide) == sorted(named for _, named in meaning)


@pytest.mark.parametrize(
    "overrides",
    [
        ["schedule=cosine"],  # flows do not use the schedule group
        ["schedule.timesteps=50"],
        ["objective.time_density=uniform"],
        ["objective.shift=3.0", "objective.loc=0.5", "objective.scale=0.8"],
        ["objective.t_eps=0.001"],
        ["objective.loss_weighting=x0"],
        ["objective.coupling=ot"],
        ["objective.discrete_steps=200"],
        ["objective=interpolant"],  # the same FlowMatching with uniform t
    ],
)
def test_a_flow_guide_trained_or_sampled_differently_is_accepted(overrides):
    check_guide(run_config("objective=flow"), SHAPE, 10, run_config("objective=flow", *overrides), SHAPE, 10)


def test_edm_guides_are_checked_on_what_preconditions_the_network():
    """EDM's network sees c_in x and c_noise(sigma) and outputs F (Karras et al. 2022, Eq. 7), each fixed by
    sigma_data; the training density and the samplers' grid do not change what F means."""
    main = run_config("objective=edm")
    guide = run_config("objective=edm", "objective.sigma_data=0.25")
    assert refusal(main, guide) == ["objective.sigma_data 0.25 vs 0.5"]
    for overrides in (
        ["schedule=cosine"],
        ["objective.P_mean=-0.4", "objective.P_std=1.0"],
        ["objective.sigma_max=20.0", "objective.sigma_min=0.01", "objective.rho=5.0"],
        ["objective.discrete_steps=100"],
    ):
        check_guide(main, SHAPE, 10, run_config("objective=edm", *overrides), SHAPE, 10)


def test_a_setting_missing_from_an_older_config_counts_as_its_default():
    """A run config written before an argument existed holds that argument's default value."""
    main = run_config("objective=flow")
    older = run_config("objective=flow")
    del older["objective"]["time_scale"], older["objective"]["path"], older["schedule"]["log_snr_shift"]
    check_guide(main, SHAPE, 10, older, SHAPE, 10)
    assert refusal(run_config("objective=flow", "objective.time_scale=1"), older) == [
        "objective.time_scale 1000.0 vs 1"
    ]
    eps = run_config()
    older = run_config()
    del older["schedule"]["log_snr_shift"], older["objective"]["variance"]
    check_guide(eps, SHAPE, 10, older, SHAPE, 10)
    assert refusal(run_config("schedule.log_snr_shift=-1.0"), older) == ["schedule.log_snr_shift 0.0 vs -1.0"]


def test_guide_settings_are_what_fixes_the_output_of_each_family():
    def objective_keys(*overrides):
        return sorted(
            k for k in guide_settings(run_config(*overrides)) if k.startswith(("objective.", "schedule."))
        )

    assert objective_keys("objective=flow") == [
        "objective._target_",
        "objective.path",
        "objective.prediction",
        "objective.time_scale",
    ]
    assert objective_keys("objective=interpolant") == objective_keys("objective=flow")
    assert objective_keys("objective=edm") == ["objective._target_", "objective.sigma_data"]
    schedule = [
        f"schedule.{k}"
        for k in (
            "_target_",
            "beta_end",
            "beta_start",
            "log_snr_shift",
            "name",
            "timesteps",
            "zero_terminal_snr",
        )
    ]
    for objective in ("eps", "hybrid", "v", "x0", "vlb"):
        assert objective_keys(f"objective={objective}") == sorted(
            ["objective._target_", "objective.parameterization", "objective.variance", *schedule]
        )
