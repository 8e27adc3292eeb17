"""Euler-Maruyama (samplers/sde.py) with ``clip_denoised=True``: the steps against a hand computation.

Clipping acts on the x_0 prediction before the step, and the pair stays consistent with x_t: with x0_c =
clip(x0_hat, -1, 1), eps_c = (x_t - alpha x0_c) / sigma (as improved-diffusion's DDIM recomputes eps from the
clipped x_0), so x_t = alpha x0_c + sigma eps_c still holds, and the drift follows from the clipped pair:

    u = d_alpha x0_c + d_sigma eps_c,   s = -eps_c / sigma,
    x_{i+1} = x_i - h (u - w s) + sqrt(2 w h) z,   and the last evaluation returns x0_c.

Linear path (alpha = 1 - t, sigma = t) with a velocity network v: x_t = x0 + t v, so x0_hat = x_t - t v.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.processes.flow import FlowMatching
from diffusion_lab.samplers.sde import euler_maruyama_sample

T64 = torch.float64
T_START, T_END, STEPS, SEED = 0.8, 0.1, 3, 7


def net(x, tt, y=None):
    """A velocity network whose x0 = x_t - t v = (1 + 3 t) x_t - 0.25 t^2 leaves [-1, 1] for most |x_t|."""
    t = (tt / 1000.0).reshape(-1, 1, 1, 1)
    return -3.0 * x + 0.25 * t


def w_of(form: str, t: float) -> float:
    return {"sigma": t, "constant": 1.0, "linear": t}[form]  # sigma(t) = t on the linear path


def by_hand(x_T, form, clip="before", recompute_eps=True):
    """The sampler written out; clip: "before" the drift (the convention), "after" it, or "none"."""
    times = [T_START + (T_END - T_START) * i / (STEPS - 1) for i in range(STEPS)]  # uniform in t
    g = torch.Generator().manual_seed(SEED)
    x = T_START * x_T  # sigma(t_start) x_T
    states, x0s, raw = [], [], []
    for i, t in enumerate(times):
        v = net(x, torch.full((x.shape[0],), 1000.0 * t, dtype=T64))
        x0, eps = x - t * v, x + (1.0 - t) * v  # the pair of the prediction: x = (1 - t) x0 + t eps
        raw.append(x0)
        x0_c = x0.clamp(-1.0, 1.0) if clip != "none" else x0
        if clip == "before":
            x0 = x0_c
            if recompute_eps:
                eps = (x - (1.0 - t) * x0) / t
        states.append(x)
        x0s.append(x0_c)
        if i == STEPS - 1:
            return x0_c, states, x0s, raw
        h = times[i] - times[i + 1]
        u, s, w = -x0 + eps, -eps / t, w_of(form, t)
        z = torch.randn(x.shape, generator=g, dtype=T64)
        x = x - h * (u - w * s) + (2.0 * w * h) ** 0.5 * z
    raise AssertionError("unreachable")


def run(x_T, form, **kw):
    d = FlowMatching(path="linear", prediction="velocity", discrete_steps=10)
    seen = []
    out = euler_maruyama_sample(
        net,
        d,
        x_T,
        STEPS,
        generator=torch.Generator().manual_seed(SEED),
        callback=lambda i, k, x, x0: seen.append((x.clone(), x0.clone())),
        diffusion_form=form,
        t_start=T_START,
        t_end=T_END,
        **kw,
    )
    return out, seen


@pytest.mark.parametrize("form", ["sigma", "constant"])
def test_clipped_steps_match_the_hand_computation(form):
    x_T = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=T64)
    out, seen = run(x_T, form, clip_denoised=True)
    ref, states, x0s, raw = by_hand(x_T, form)
    # the premise: at every step some x0 entries are clipped and some are not
    for x0 in raw:
        outside = x0.abs() > 1.0
        assert outside.any() and not outside.all()
    assert len(seen) == STEPS
    for (x, x0), x_ref, x0_ref in zip(seen, states, x0s, strict=True):
        torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(x0, x0_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # the test tells the convention from its near misses: no clip, clip after the drift, eps not recomputed
    for wrong in (dict(clip="none"), dict(clip="after"), dict(recompute_eps=False)):
        assert float((by_hand(x_T, form, **wrong)[1][-1] - states[-1]).abs().max()) > 1e-3, wrong


def test_clipping_is_the_identity_when_x0_stays_within_the_range():
    """With every x0 prediction inside [-1, 1] (the ODE, diffusion_norm = 0, from a small x_T),
    clip_denoised=True and False give the same samples."""
    x_T = 0.05 * torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=T64)
    on, _ = run(x_T, "sigma", clip_denoised=True, diffusion_norm=0.0)
    off, seen = run(x_T, "sigma", clip_denoised=False, diffusion_norm=0.0)
    assert max(float(x0.abs().max()) for _, x0 in seen) < 1.0
    torch.testing.assert_close(on, off, rtol=0, atol=1e-12)
