"""``python -m diffusion_lab.evaluate metrics=[bpd_ode]`` end to end, in this process.

The checkpoint is the tiny digits model; its objective is swapped for an exact field with a known density
(x_0 ~ N(0, lam I) on the linear path x_t = (1 - t) x_0 + t eps), so the number has a closed form:
per pixel, E_u[-log N(x_k + u; 0, lam)] = 1/2 log(2 pi lam) + (x_k^2 + h^2 / 3) / (2 lam), h = 1/255.
"""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import diffusion_lab.evaluate as evaluate_cmd
from diffusion_lab.processes.likelihood_ode import bpd_offset
from diffusion_lab.train import CONF_DIR

LAM = 0.4


class LinearPath:
    t_min, t_max = 0.0, 1.0

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return -torch.ones_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)


class IsotropicGaussianFlow(torch.nn.Module):
    """path() and velocity(): the exact drift of N(0, LAM I) data, d_alpha E[x_0 | x] + d_sigma E[eps | x]."""

    def path(self):
        return LinearPath()

    def velocity(self, model, x, t, y=None):
        t = t.reshape(-1, *([1] * (x.ndim - 1)))
        return (t - (1 - t) * LAM) / ((1 - t) ** 2 * LAM + t**2) * x


def test_evaluate_bpd_ode_reports_mean_stderr_and_nfe(tiny_checkpoint, monkeypatch, capsys):
    real_load = evaluate_cmd.load_module

    def load_with_exact_field(*args, **kwargs):
        module, run_cfg, ckpt = real_load(*args, **kwargs)
        module.diffusion = IsotropicGaussianFlow()
        return module, run_cfg, ckpt

    monkeypatch.setattr(evaluate_cmd, "load_module", load_with_exact_field)
    GlobalHydra.instance().clear()
    overrides = [f"ckpt={tiny_checkpoint}", "metrics=[bpd_ode]", "bpd_n=8", "bpd_batch_size=4"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("evaluate", overrides + ["bpd_ode.steps=16", "device=cpu"])
    results = evaluate_cmd.evaluate(cfg)
    assert results["bpd_ode_images"] == 8 and results["bpd_ode_nfe"] == 32  # Heun: 2 per step
    assert results["bpd_ode_stderr"] > 0 and "fid_classifier" not in results

    images = evaluate_cmd.instantiate_checked(cfg_run(tiny_checkpoint).dataset, "dataset")
    images.prepare_data()
    x = images.real_images("test", 8)[0].double().flatten(1) / 127.5 - 1  # (8, 64) bin centres
    nats = 0.5 * math.log(2 * math.pi * LAM) + (x**2 + (1 / 255) ** 2 / 3) / (2 * LAM)
    expected = (nats.sum(1) / (x.shape[1] * math.log(2)) + bpd_offset()).mean().item()
    assert results["bpd_ode"] == pytest.approx(expected, abs=0.01)

    evaluate_cmd._print_table(results)
    assert "upper bound" in capsys.readouterr().out


def cfg_run(ckpt):
    from diffusion_lab.training.checkpoint import load_module

    return load_module(ckpt)[1]
