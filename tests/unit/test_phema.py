"""Post-hoc EMA math (Karras et al. 2024, EDM2 Sec. 3 and App. C) against closed forms and a tracked EMA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_lab.training.checkpoint_io import atomic_torch_save
from diffusion_lab.training.phema import (
    gamma_to_sigma_rel,
    list_snapshots,
    power_ema_beta,
    power_ema_update_,
    profile_inner_product,
    reconstruct_state,
    sigma_rel_to_gamma,
    snapshot_path,
    solve_weights,
)


def test_sigma_rel_to_gamma_matches_edm2_closed_form():
    """EDM2 Eq. 3: sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3))); 0.05 -> 16.97, 0.10 -> 6.94."""
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for s in (0.01, 0.05, 0.08, 0.10, 0.2, 0.28):
        g = sigma_rel_to_gamma(s)
        assert g > 0
        assert np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(s, rel=1e-10)
        assert gamma_to_sigma_rel(g) == pytest.approx(s, rel=1e-10)
    arr = sigma_rel_to_gamma(np.array([0.05, 0.10]))
    assert arr.shape == (2,) and arr[0] > arr[1]  # a shorter EMA has a larger exponent


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.29, float("nan")])
def test_sigma_rel_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(bad)


def test_beta_starts_with_a_copy_and_tends_to_one():
    g = sigma_rel_to_gamma(0.1)
    assert power_ema_beta(g, 1) == 0.0
    assert power_ema_beta(g, 100) == pytest.approx((1 - 1 / 100) ** (g + 1))
    assert power_ema_beta(g, 10) < power_ema_beta(g, 1000) < 1.0


def test_inner_product_matches_numeric_integral():
    """<p_a, p_b> with p_(t, g)(tau) = (g + 1) tau^g / t^(g + 1) on [0, t] (EDM2 Eq. 2), by quadrature."""
    for t_a, g_a, t_b, g_b in [
        (700.0, 16.97, 1000.0, 6.94),
        (1000.0, 3.0, 400.0, 9.0),
        (500.0, 5.0, 500.0, 5.0),
    ]:
        tau = np.linspace(0.0, min(t_a, t_b), 400_001)
        pa = (g_a + 1) * tau**g_a / t_a ** (g_a + 1)
        pb = (g_b + 1) * tau**g_b / t_b ** (g_b + 1)
        numeric = np.trapezoid(pa * pb, tau)
        assert profile_inner_product(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-6)


def test_reconstruction_of_a_third_sigma_rel_matches_a_tracked_ema(tmp_path):
    """A random-walk-with-drift trajectory of 3,000 steps; profiles 0.05 and 0.10 snapshotted every 100 steps
    into files; the reconstruction of sigma_rel 0.08 at the last step matches an EMA tracked at 0.08 with the
    same update, far closer than either tracked profile is to it."""
    g = torch.Generator().manual_seed(0)
    T, every, d = 3000, 100, 64
    rels = [0.05, 0.10, 0.08]
    theta = torch.zeros(d, dtype=torch.float64)
    emas = [theta.clone() for _ in rels]
    for t in range(1, T + 1):
        theta = theta + 0.1 * torch.randn(d, generator=g, dtype=torch.float64) + 0.01
        for r, e in zip(rels, emas):
            power_ema_update_([e], [theta], power_ema_beta(sigma_rel_to_gamma(r), t))
        if t % every == 0:
            atomic_torch_save(
                {
                    "step": t,
                    "sigma_rels": rels[:2],
                    "profiles": [{"w": emas[0].clone()}, {"w": emas[1].clone()}],
                },
                snapshot_path(tmp_path, t),
            )
    snaps = list_snapshots(tmp_path)
    assert [s for s, _ in snaps] == list(range(every, T + 1, every))
    state, info = reconstruct_state(snaps, 0.08)
    direct = emas[2]
    scale = (emas[0] - emas[1]).norm()
    assert info["step"] == T and info["coefficient_sum"] == pytest.approx(1.0, abs=1e-3)
    assert (state["w"] - direct).norm() < 1e-3 * scale
    assert (emas[0] - direct).norm() > 0.3 * scale and (emas[1] - direct).norm() > 0.3 * scale
    # an earlier step: the snapshots up to it only, and the reconstruction is the tracked profile itself
    state, info = reconstruct_state(snaps, 0.10, step=1500)
    assert len(info["snapshots"]) == 15


def test_solve_weights_reproduces_an_input_profile():
    """Asking for a profile that is one of the inputs gives weight one on it (to least-squares precision)."""
    steps = [100, 200, 300, 300]
    rels = [0.05, 0.05, 0.05, 0.10]
    x = solve_weights(steps, rels, 300, 0.10)
    assert x == pytest.approx([0, 0, 0, 1], abs=1e-6)


def test_reconstruct_refuses_a_step_without_snapshot(tmp_path):
    atomic_torch_save(
        {"step": 10, "sigma_rels": [0.05], "profiles": [{"w": torch.ones(2)}]}, snapshot_path(tmp_path, 10)
    )
    with pytest.raises(ValueError, match="no snapshot"):
        reconstruct_state(list_snapshots(tmp_path), 0.05, step=7)
    with pytest.raises(FileNotFoundError, match="callbacks=phema"):
        reconstruct_state([], 0.05)
