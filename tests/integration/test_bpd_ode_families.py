"""bits/dim from the probability-flow ODE on real (tiny) checkpoints of every family, through evaluate,
against the closed form.

Each checkpoint is trained for 3 steps, then its network is replaced by the exact one for Gaussian data
N(0, S2 I) in the family's own parameterization (written out below from the papers): the rest (the stored
objective, its ODE interval, the conversions to the velocity, the prior, the dequantization, the evaluate
loop) is the real code. The density the ODE gives is then known: the data enter at the interval's start t0
in the variance-exploding view, so bits/dim = -log N(x; 0, (S2 + sigma_ve(t0)^2) I) / (D ln 2) + log2(127.5).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import diffusion_lab.evaluate as evaluate_module
from diffusion_lab.evaluate import evaluate
from diffusion_lab.processes.likelihood_ode import dequantize
from diffusion_lab.train import CONF_DIR, train

CHECKPOINTING = [
    "callbacks=default",
    "callbacks.sample_grid=null",
    "callbacks.progress_bar=null",
    "callbacks.model_checkpoint.every_n_train_steps=3",
]
S2 = 0.2


def _posterior_factors(a, s):
    """E[x0 | x_t] = fx x_t and E[eps | x_t] = fe x_t for x_0 ~ N(0, S2 I), x_t = a x_0 + s eps."""
    v = a * a * S2 + s * s
    return a * S2 / v, s / v


class IdealDDPM(torch.nn.Module):
    """eps_hat at discrete step k (Ho et al. 2020): a_k = sqrt(alpha_bar_k)."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.register_buffer("ab", alphas_cumprod.double())

    def forward(self, x, k, y=None):
        ab = self.ab[k].reshape(-1, 1, 1, 1)
        _, fe = _posterior_factors(ab.sqrt(), (1 - ab).sqrt())
        return (fe * x.double()).to(x.dtype)


class IdealEDM(torch.nn.Module):
    """F with D = c_skip x + c_out F = S2 / (S2 + sigma^2) x (EDM Eq. 7, Table 1): input c_in x, c_noise."""

    def __init__(self, sigma_data):
        super().__init__()
        self.sd = float(sigma_data)

    def forward(self, x_in, c_noise, y=None):
        sigma = (4 * c_noise.double()).exp().reshape(-1, 1, 1, 1)
        sd2 = self.sd**2
        x = x_in.double() * (sigma**2 + sd2).sqrt()
        D = S2 / (S2 + sigma**2) * x
        c_skip, c_out = sd2 / (sigma**2 + sd2), sigma * self.sd / (sigma**2 + sd2).sqrt()
        return ((D - c_skip * x) / c_out).to(x_in.dtype)


class IdealFlow(torch.nn.Module):
    """The velocity (linear path) or the noise (GVP path) at t = input / 1000."""

    def __init__(self, path, prediction):
        super().__init__()
        self.path, self.prediction = path, prediction

    def forward(self, x, tt, y=None):
        t = (tt.double() / 1000).reshape(-1, 1, 1, 1)
        if self.path == "linear":
            a, s, da, ds = 1 - t, t, -1.0, 1.0
        else:
            h = 0.5 * math.pi
            a, s, da, ds = torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)
        fx, fe = _posterior_factors(a, s)
        out = (da * fx + ds * fe) if self.prediction == "velocity" else fe
        return (out * x.double()).to(x.dtype)


# (overrides, the ideal network, sigma_ve at the ODE's start, the tolerance in bits/dim)
FAMILIES = {
    # DDPM at T = 1000 (Ho et al.'s betas, beta_1 = 1e-4): t0 = 1 / T. Between steps the network runs at the
    # nearest step (DiscreteVPPath.nearest_step), not the exact field: 0.009 bits/dim off at T = 50, 5e-4 at
    # T = 1000 in an adaptive float64 solve, 5e-3 here in float32.
    "ddpm": (
        ["objective=eps", "schedule.timesteps=1000"],
        lambda m: IdealDDPM(m.diffusion.alphas_cumprod),
        math.sqrt(1e-4 / (1 - 1e-4)),
        1e-2,
    ),
    "edm": (["objective=edm"], lambda m: IdealEDM(m.diffusion.sigma_data), 0.002, 2e-3),  # VE from sigma_min
    "flow": (["objective=flow"], lambda m: IdealFlow("linear", "velocity"), 0.0, 2e-3),  # [0, 1]
    # SiT's GVP noise model: [1e-3, 1 - 1e-3], sigma_ve(1e-3) = tan(pi 1e-3 / 2)
    "sit_gvp_noise": (
        ["objective=interpolant", "objective.path=gvp", "objective.prediction=noise"],
        lambda m: IdealFlow("gvp", "noise"),
        math.tan(0.5 * math.pi * 1e-3),
        2e-3,
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bpd_ode_for_every_family(tmp_path, family, monkeypatch):
    overrides, ideal, sigma0, tol = FAMILIES[family]
    ckpt = Path(train(compose_config(tmp_path, FAST + CHECKPOINTING + overrides))["last_checkpoint"])
    real_load, real_loop, seen = evaluate_module.load_module, evaluate_module.ode_bpd_over_images, {}

    def load_ideal(*args, **kwargs):
        module, cfg, raw = real_load(*args, **kwargs)
        module.model = ideal(module)
        return module, cfg, raw

    def loop(objective, model, images, *args, **kwargs):
        seen["images"] = images
        return real_loop(objective, model, images, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "load_module", load_ideal)
    monkeypatch.setattr(evaluate_module, "ode_bpd_over_images", loop)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "evaluate",
            [
                f"ckpt={ckpt}",
                "metric_names=[bpd_ode]",
                "bpd_n=6",
                "bpd_batch_size=6",
                "device=cpu",
                f"out={tmp_path / 'eval.json'}",
            ],
        )
    results = evaluate(cfg)
    # the same dequantization as the loop: one batch, the evaluate seed's generator drawn first
    x = dequantize(seen["images"], generator=torch.Generator().manual_seed(int(cfg.seed))).double().flatten(1)
    var, D = S2 + sigma0**2, x.shape[1]
    nll = 0.5 * (x**2).sum(1) / var + 0.5 * D * math.log(2 * math.pi * var)
    expected = float((nll / (D * math.log(2)) + math.log2(127.5)).mean())
    assert results["bpd_ode_images"] == 6
    assert results["bpd_ode"] == pytest.approx(expected, abs=tol), (results["bpd_ode"], expected)
