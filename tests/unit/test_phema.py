"""Post-hoc EMA math (Karras et al. 2024, EDM2 Sec. 3 and App. C) against closed forms and a tracked EMA."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.integrate import trapezoid  # numpy's own is numpy >= 2 only

from diffusion_lab.training.checkpoint_io import atomic_torch_save
from diffusion_lab.training.phema import (
    PostHocEMA,
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

# ------------------------------------------------- an independent reference: NVlabs/edm2 training/phema.py


def edm2_std_to_exp(sigma_rel: float) -> float:
    """EDM2 ``std_to_exp``: the largest root of gamma^3 + 7 gamma^2 + (16 - t) gamma + (12 - t),
    t = sigma_rel^-2."""
    t = float(sigma_rel) ** -2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def edm2_p_dot_p(t_a, gamma_a, t_b, gamma_b):
    """EDM2 ``power_function_correlation``: <p_(t_a, gamma_a), p_(t_b, gamma_b)> (EDM2 App. C.2, Eq. 151)."""
    t_ratio = t_a / t_b
    t_exp = np.where(t_a < t_b, gamma_b, -gamma_a)
    t_max = np.maximum(t_a, t_b)
    num = (gamma_a + 1) * (gamma_b + 1) * t_ratio**t_exp
    den = (gamma_a + gamma_b + 1) * t_max
    return num / den


def edm2_coefficients(in_steps, in_sigma_rels, out_step, out_sigma_rel) -> np.ndarray:
    """EDM2 ``solve_posthoc_coefficients`` (Algorithm 3): solve A X = B, then X / sum(X)."""
    t = np.float64(in_steps).reshape(-1, 1)
    g = np.float64([edm2_std_to_exp(s) for s in in_sigma_rels]).reshape(-1, 1)
    A = edm2_p_dot_p(t, g, t.T, g.T)
    B = edm2_p_dot_p(t, g, np.float64(out_step), edm2_std_to_exp(out_sigma_rel))
    X = np.linalg.solve(A, B)
    return (X / np.sum(X, axis=0)).reshape(-1)


def _pairs(n_snapshots: int, every: int = 100) -> tuple[list[int], list[float]]:
    """The basis of ``n_snapshots`` snapshots of the profiles 0.05 and 0.10, every ``every`` steps, in the
    order :func:`reconstruct_state` uses: snapshot by snapshot, the profiles of each in order."""
    steps = [every * k for k in range(1, n_snapshots + 1) for _ in range(2)]
    return steps, [0.05, 0.10] * n_snapshots


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
    for s in (0.01, 0.05, 0.08, 0.10, 0.2, 0.28):
        assert sigma_rel_to_gamma(s) == pytest.approx(edm2_std_to_exp(s), rel=1e-12)


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
        numeric = trapezoid(pa * pb, tau)
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


@pytest.mark.parametrize("n_snapshots", [2, 3, 4])
@pytest.mark.parametrize("target", [0.01, 0.20])
def test_coefficients_sum_to_one_and_match_edm2(n_snapshots, target):
    """A target outside the tracked pair (0.05, 0.10), few snapshots: the least-squares projection carries
    mass 0.52-0.91 only; the coefficients are normalised to sum to one (EDM2 Algorithm 3) and equal EDM2's
    own solve, written out above, to 1e-8."""
    steps, rels = _pairs(n_snapshots)
    x = solve_weights(steps, rels, steps[-1], target)
    assert x.shape == (2 * n_snapshots,)
    assert x.sum() == pytest.approx(1.0, abs=1e-10)
    np.testing.assert_allclose(x, edm2_coefficients(steps, rels, steps[-1], target), rtol=0, atol=1e-8)


def test_reconstruction_of_a_constant_trajectory_is_that_constant(tmp_path):
    """Weights that never change leave every profile of every snapshot equal to them; any weighted average
    of the snapshots returns them exactly (before the normalisation: 0.725 of them at sigma_rel 0.01)."""
    const = torch.tensor([0.37, -1.25, 3.0, 1e-3], dtype=torch.float32)
    for step in (100, 200, 300, 400):
        atomic_torch_save(
            {
                "step": step,
                "sigma_rels": [0.05, 0.10],
                "profiles": [{"w": const.clone()}, {"w": const.clone()}],
            },
            snapshot_path(tmp_path, step),
        )
    for target in (0.01, 0.08, 0.20):
        state, info = reconstruct_state(list_snapshots(tmp_path), target)
        assert state["w"].dtype == torch.float32
        # float64 sum of float32 copies, rounded back to float32: the same bits
        assert torch.equal(state["w"], const), (state["w"] - const).abs().max()
        assert info["coefficient_sum"] == pytest.approx(1.0, abs=1e-10)


def _fake_run(tmp_path, n_snapshots: int = 3):
    """A run folder: ``n_snapshots`` snapshots of two profiles with distinct random weights, and a
    ``last.ckpt``; returns (run_dir, {(step, profile index): weights})."""
    gen = torch.Generator().manual_seed(3)
    run = tmp_path / "run"
    weights = {}
    for k in range(1, n_snapshots + 1):
        profiles = []
        for j in range(2):
            weights[(100 * k, j)] = torch.randn(3, 2, generator=gen, dtype=torch.float64)
            profiles.append({"net.w": weights[(100 * k, j)].float()})
        atomic_torch_save(
            {"step": 100 * k, "sigma_rels": [0.05, 0.10], "profiles": profiles},
            snapshot_path(run / "phema", 100 * k),
        )
    base = {
        "hyper_parameters": {"config": {"model": {"name": "mlp"}}},
        "state_dict": {"net.w": torch.zeros(3, 2), "net.b": torch.ones(2)},
        "global_step": 100 * n_snapshots,
        "optimizer_states": [{}],
    }
    atomic_torch_save(base, run / "checkpoints" / "last.ckpt")
    return run, weights


def test_reconstruction_is_the_edm2_weighted_sum_of_snapshots(tmp_path):
    """reconstruct_state at sigma_rel 0.01 (3 snapshots) = sum_i x_i theta_hat_i with EDM2's coefficients,
    each snapshot's profiles in the order of its ``sigma_rels``."""
    run, weights = _fake_run(tmp_path)
    state, info = reconstruct_state(list_snapshots(run / "phema"), 0.01)
    steps, rels = _pairs(3)
    x = edm2_coefficients(steps, rels, 300, 0.01)
    expected = sum(x[i] * weights[(steps[i], i % 2)].float().double() for i in range(6))
    np.testing.assert_allclose(info["coefficients"], x, rtol=0, atol=1e-8)
    torch.testing.assert_close(state["net.w"].double(), expected, rtol=1e-6, atol=1e-6)


def test_phema_command_writes_the_normalised_reconstruction(tmp_path, capsys):
    """``python -m diffusion_lab.phema`` (its ``run`` on the composed ``conf/phema.yaml``): the checkpoint's
    EMA weights are the EDM2-weighted sum of the snapshots, its recorded coefficients sum to one, the weights
    not in the snapshots stay."""
    from diffusion_lab.api import compose_config
    from diffusion_lab.phema import run as phema

    run, weights = _fake_run(tmp_path)
    out = tmp_path / "rec.ckpt"
    phema(compose_config("phema", [f"run_dir={run}", "sigma_rel=0.20", "step=200", f"out={out}"]))
    assert str(out) in capsys.readouterr().out
    rec = torch.load(out, weights_only=True)
    steps, rels = _pairs(2)
    x = edm2_coefficients(steps, rels, 200, 0.20)
    assert sum(rec["phema"]["coefficients"]) == pytest.approx(1.0, abs=1e-10)
    np.testing.assert_allclose(rec["phema"]["coefficients"], x, rtol=0, atol=1e-8)
    expected = sum(x[i] * weights[(steps[i], i % 2)].float().double() for i in range(4))
    torch.testing.assert_close(rec["state_dict"]["net.w"].double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(rec["state_dict"]["net.b"], torch.ones(2))
    assert torch.equal(rec["current_model_state"]["net.w"], torch.zeros(3, 2))
    assert rec["global_step"] == 200 and "optimizer_states" not in rec


# --------------------------------------------- the callback against a power EMA unrolled in closed form


def _theta(t: int) -> np.ndarray:
    """A known, non-monotone weight trajectory theta_t (3 weights), float64."""
    return np.array([np.sin(0.3 * t) + 0.05 * t, np.cos(0.11 * t) * t**0.5, 1.0 / (1.0 + t)])


def _closed_form_power_ema(gamma: float, n: int) -> np.ndarray:
    """theta_hat_N = sum_t w_t theta_t, EDM2 Eq. 4 unrolled: w_t = (1 - beta_t) prod_(s > t) beta_s with
    beta_t = (1 - 1/t)^(gamma + 1); beta_1 = 0, so theta_0 gets no weight and sum_t w_t = 1."""
    beta = np.array([(1.0 - 1.0 / t) ** (gamma + 1.0) for t in range(1, n + 1)])
    w = np.array([(1.0 - beta[t - 1]) * np.prod(beta[t:]) for t in range(1, n + 1)])
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    return sum(w[t - 1] * _theta(t) for t in range(1, n + 1))


def test_callback_profiles_match_the_closed_form_power_ema(tmp_path):
    """Drive PostHocEMA's own hooks with a fake trainer over theta_1..theta_N, two micro-batches per optimizer
    step (as with gradient accumulation: the hook runs twice with one global_step). After step 1 every profile
    is theta_1; after step N each profile is the unrolled power EMA of its gamma (sigma_rel 0.05, 0.10) to
    1e-10 relative, and the final snapshot holds the same."""
    n = 40
    module = torch.nn.Linear(3, 1, bias=False).double()  # float64 weights, so the comparison is to 1e-10
    trainer = SimpleNamespace(global_step=0, default_root_dir=str(tmp_path), ckpt_path=None)
    cb = PostHocEMA(sigma_rels=(0.05, 0.10), every_n_steps=1000, max_snapshots=2)

    def set_weights(t: int) -> None:
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(_theta(t)).view(1, 3))

    set_weights(0)
    cb.on_train_start(trainer, module)
    cb.on_train_batch_end(trainer, module, None, None, 0)  # step 0: no optimizer step yet, no update
    for t in range(1, n + 1):
        set_weights(t)
        trainer.global_step = t
        for micro in range(2):
            cb.on_train_batch_end(trainer, module, None, None, 2 * t - 1 + micro)
        if t == 1:
            for profile in cb.profiles:
                assert torch.equal(profile["weight"].view(-1), torch.from_numpy(_theta(1)))
    gammas = [edm2_std_to_exp(0.05), edm2_std_to_exp(0.10)]
    cb.on_train_end(trainer, module)
    (snap,) = [torch.load(p, weights_only=True) for _, p in list_snapshots(tmp_path / "phema")]
    assert snap["step"] == n
    for k, gamma in enumerate(gammas):
        expected = _closed_form_power_ema(gamma, n)
        for got in (cb.profiles[k]["weight"], snap["profiles"][k]["weight"]):
            np.testing.assert_allclose(got.view(-1).numpy(), expected, rtol=1e-10, atol=0)
    # the two profiles really differ (a check that would pass with one shared gamma could not tell them apart)
    assert np.abs(_closed_form_power_ema(gammas[0], n) - _closed_form_power_ema(gammas[1], n)).max() > 1e-2
