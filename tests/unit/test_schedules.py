"""Noise schedules against their defining formulas."""

import math

import pytest
import torch

from diffusion_lab.processes.schedules import SCHEDULES, make_schedule


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("T", [10, 100, 1000])
def test_betas_valid_and_alpha_bar_decreasing(name, T):
    s = make_schedule(name, T)
    assert s.betas.dtype == torch.float64 and s.betas.shape == (T,)
    assert (s.betas > 0).all() and (s.betas < 1).all()
    ab = s.alphas_cumprod
    assert (ab[1:] < ab[:-1]).all(), "alpha_bar must decrease strictly"
    assert torch.allclose(s.alphas, 1 - s.betas)
    assert (s.log_snr[1:] < s.log_snr[:-1]).all()
    assert ab[-1] < 0.05, f"{name}: alpha_bar_T = {ab[-1]:.3g} should be near 0"


def test_linear_endpoints_and_scaling():
    s = make_schedule("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(
        s.betas[1:] - s.betas[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64)
    )
    s4 = make_schedule("linear", 4000)  # Improved DDPM: scaled by 1000/T
    assert s4.betas[0].item() == pytest.approx(2.5e-5)
    assert s4.betas[-1].item() == pytest.approx(0.005)
    assert s4.alphas_cumprod[-1] < 1e-4


def test_cosine_matches_closed_form():
    T, s_ = 1000, 0.008
    sched = make_schedule("cosine", T, s=s_)

    def f(t):
        return math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2

    for t in [1, 10, 500, 900]:  # paper index t -> entry t-1, alpha_bar_t = f(t)/f(0)
        assert sched.alphas_cumprod[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert sched.betas.max().item() <= 0.999
    assert sched.betas[-1].item() == pytest.approx(0.999)  # clipped


def test_sigmoid_closed_form():
    T, start, end, tau = 1000, -3.0, 3.0, 1.0
    s = make_schedule("sigmoid", T, start=start, end=end, tau=tau)

    def sig(x):
        return 1 / (1 + math.exp(-x))

    v0, v1 = sig(start / tau), sig(end / tau)
    for t in [1, 250, 999]:
        expect = (v1 - sig(((t / T) * (end - start) + start) / tau)) / (v1 - v0)
        assert s.alphas_cumprod[t - 1].item() == pytest.approx(expect, rel=1e-7)


def test_quadratic_and_geometric_shape():
    q = make_schedule("quadratic", 1000)
    sq = q.betas.sqrt()
    assert torch.allclose(sq[1:] - sq[:-1], (sq[1] - sq[0]).expand(999), atol=1e-12)
    assert q.betas[0].item() == pytest.approx(1e-4) and q.betas[-1].item() == pytest.approx(0.02)
    g = make_schedule("geometric", 1000)
    ratio = g.betas[1:] / g.betas[:-1]
    assert torch.allclose(ratio, ratio[0].expand(999), rtol=1e-10)
    assert g.betas[0].item() == pytest.approx(1e-4) and g.betas[-1].item() == pytest.approx(0.02)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_zero_terminal_snr(name):
    base = make_schedule(name, 1000)
    s = make_schedule(name, 1000, zero_terminal_snr=True)
    assert s.alphas_cumprod[-1].item() == 0.0
    assert s.alphas_cumprod[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-9)
    assert s.log_snr[-1].item() == -math.inf
    assert (s.alphas_cumprod[1:] <= s.alphas_cumprod[:-1]).all()


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("shift", [-2.0, 1.5])
def test_log_snr_shift_moves_every_step_by_the_shift(name, shift):
    """Hoogeboom et al. 2023, Sec. 3.1: log SNR'(t) = log SNR(t) + shift, away from the max_beta cap."""
    base = make_schedule(name, 1000)
    s = make_schedule(name, 1000, log_snr_shift=shift)
    uncapped = s.betas < 0.999
    assert uncapped[:900].all()
    diff = (s.log_snr - base.log_snr)[uncapped]
    assert torch.allclose(diff, torch.full_like(diff, shift), atol=1e-6)
    # alpha_bar = sigmoid(log SNR): the closed form at one step, by hand
    t = 400
    expected = 1.0 / (1.0 + math.exp(-(base.log_snr[t].item() + shift)))
    assert s.alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-9)
    assert torch.equal(make_schedule(name, 1000, log_snr_shift=0.0).betas, base.betas)


def test_log_snr_shift_then_zero_terminal_snr():
    s = make_schedule("sigmoid", 1000, log_snr_shift=-1.0, zero_terminal_snr=True)
    shifted = make_schedule("sigmoid", 1000, log_snr_shift=-1.0)
    assert s.alphas_cumprod[-1].item() == 0.0
    assert s.alphas_cumprod[0].item() == pytest.approx(shifted.alphas_cumprod[0].item(), rel=1e-9)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="unknown schedule 'cosin'.*cosine.*linear"):
        make_schedule("cosin", 1000)
    with pytest.raises(ValueError, match="timesteps"):
        make_schedule("linear", 1)
    with pytest.raises(ValueError, match="invalid parameters"):
        make_schedule("cosine", 100, bogus=1)
    with pytest.raises(ValueError, match="tau"):
        make_schedule("sigmoid", 100, tau=0)
    with pytest.raises(ValueError, match=r"beta_end must lie in \(0, 1\)"):
        make_schedule("linear", 1000, beta_end=1.5)
    with pytest.raises(ValueError, match="log_snr_shift must be a finite number"):
        make_schedule("cosine", 100, log_snr_shift=float("nan"))
    with pytest.raises(ValueError, match="log_snr_shift must be a finite number"):
        make_schedule("cosine", 100, log_snr_shift="-1")
    short = make_schedule("linear", 10)  # 1000/T scaling would give beta_T = 2: capped at 0.999
    assert short.betas.max().item() == pytest.approx(0.999)
