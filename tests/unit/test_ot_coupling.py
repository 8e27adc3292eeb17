"""Minibatch OT coupling (OT-CFM, Tong et al. 2023, Alg. 3): ``ot_pairing`` and ``training_losses``.

The reference is an exact OT solve written out here: between two uniform empirical measures of B points
the optimal plan is a permutation (Birkhoff), so brute force over all B! permutations of the squared
Euclidean cost C_ij = ||x0_i - eps_j||^2 finds it. The coupling re-pairs the noise with the data; the data
and its labels stay together, in their original order.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from diffusion_lab.processes.flow import FlowMatching, ot_pairing

T64 = torch.float64


def brute_force_ot(x0: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(perm, best, second): eps[perm] minimises sum_i ||x0_i - eps_perm_i||^2 over all B! permutations;
    best and second are the smallest and next-smallest total costs (a gap means a unique optimum)."""
    B = x0.shape[0]
    a, b = x0.reshape(B, -1).to(T64), eps.reshape(B, -1).to(T64)
    C = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)  # (B, B), C[i, j] = ||x0_i - eps_j||^2
    perms = torch.tensor(list(itertools.permutations(range(B))))  # (B!, B)
    totals = C[torch.arange(B), perms].sum(1)  # (B!,)
    order = totals.argsort()
    return perms[order[0]], float(totals[order[0]]), float(totals[order[1]])


def row_permutation(paired: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """perm with paired == eps[perm], asserting every row of eps is used exactly once (multiset equality)."""
    B = eps.shape[0]
    same = (paired.reshape(B, 1, -1) == eps.reshape(1, B, -1)).all(-1)  # (B, B)
    assert same.sum(1).eq(1).all(), "a re-paired row is not exactly one of the original noise rows"
    perm = same.to(torch.int64).argmax(1)
    assert sorted(perm.tolist()) == list(range(B)), "the re-paired noise is not a permutation of the rows"
    return perm


def draw(B: int, seed: int, shape=(2, 2, 2)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *shape, generator=g, dtype=T64), torch.randn(B, *shape, generator=g, dtype=T64)


# ------------------------------------------------------------------------------------ the plan


@pytest.mark.parametrize("B,seed", [(6, 0), (6, 1), (7, 2), (7, 3)])
def test_plan_is_the_exact_optimum_of_a_brute_force_solve(B, seed):
    x0, eps = draw(B, seed)
    perm, best, second = brute_force_ot(x0, eps)
    assert second - best > 1e-6  # distinct random points: the optimum is unique
    assert not torch.equal(perm, torch.arange(B))  # the test data need re-pairing
    paired = ot_pairing(x0, eps)
    assert paired.dtype == eps.dtype and paired.shape == eps.shape
    total = float(((x0 - paired) ** 2).sum())
    assert abs(total - best) < 1e-9, (total, best)
    torch.testing.assert_close(row_permutation(paired, eps), perm, rtol=0, atol=0)


def test_plan_uses_the_squared_distance_not_the_distance():
    """Two points each side, where the squared and the plain Euclidean cost disagree:

        x0 = A (0, 0), B (1, 0);   eps = D (1, 1.1), C (0.9, 0)
        as given (A-D, B-C):  squared 2.21 + 0.01 = 2.22,   plain sqrt(2.21) + 0.1 = 1.587
        swapped  (A-C, B-D):  squared 0.81 + 1.21 = 2.02,   plain 0.9 + 1.1 = 2.0

    OT-CFM's W2 plan (squared) swaps the noise; the W1 plan (plain distance) would keep it."""
    x0 = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=T64).reshape(2, 1, 1, 2)
    eps = torch.tensor([[1.0, 1.1], [0.9, 0.0]], dtype=T64).reshape(2, 1, 1, 2)
    paired = ot_pairing(x0, eps)
    torch.testing.assert_close(paired, eps[[1, 0]], rtol=0, atol=0)
    assert abs(float(((x0 - paired) ** 2).sum()) - 2.02) < 1e-12


def test_plan_in_float32_matches_the_float64_optimum():
    x0, eps = draw(7, 4)
    perm, _, _ = brute_force_ot(x0, eps)
    paired = ot_pairing(x0.float(), eps.float())
    assert paired.dtype == torch.float32
    torch.testing.assert_close(row_permutation(paired, eps.float()), perm, rtol=0, atol=0)


# ------------------------------------------------------------------------- inside training_losses


class Recorder:
    """A class-conditional stub network: records (x_t, t_in, y) and returns 0.5 x_t + offset[y]."""

    def __init__(self, offsets: torch.Tensor):
        self.offsets, self.calls = offsets, []

    def __call__(self, x, tt, y=None):
        self.calls.append((x.clone(), tt.clone(), y.clone()))
        return 0.5 * x + self.offsets[y].reshape(-1, 1, 1, 1).to(x.dtype)


def closed_form(path: str, t: torch.Tensor):
    """alpha, sigma, d_alpha, d_sigma of the path at t, shaped (B, 1, 1, 1)."""
    t = t.reshape(-1, 1, 1, 1)
    if path == "linear":  # alpha = 1 - t, sigma = t
        return 1.0 - t, t, -torch.ones_like(t), torch.ones_like(t)
    h = 0.5 * math.pi  # gvp: alpha = cos(pi t / 2), sigma = sin(pi t / 2)
    return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)


@pytest.mark.parametrize("path", ["linear", "gvp"])
@pytest.mark.parametrize("coupling", ["ot", "none"])
def test_training_losses_re_pair_the_noise_and_keep_each_image_with_its_label(path, coupling):
    B = 6
    x0, eps = draw(B, 5)
    x0_in, eps_in = x0.clone(), eps.clone()
    y = torch.tensor([5, 0, 3, 2, 4, 1])
    t = torch.tensor([0.1, 0.25, 0.4, 0.55, 0.7, 0.9], dtype=T64)
    offsets = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.5, 3.0], dtype=T64)  # per class
    ot_perm, _, _ = brute_force_ot(x0, eps)
    assert not torch.equal(ot_perm, torch.arange(B))  # OT and none differ on this batch
    perm = ot_perm if coupling == "ot" else torch.arange(B)
    eps_p = eps[perm]

    d = FlowMatching(path=path, prediction="velocity", coupling=coupling, discrete_steps=10)
    net = Recorder(offsets)
    out = d.training_losses(net, x0, t=t, eps=eps, y=y)

    assert len(net.calls) == 1
    x_t, t_in, y_in = net.calls[0]
    a, s, da, ds = closed_form(path, t)
    # the network sees x_t = alpha x0 + sigma eps_perm, row i built on x0_i: the data keep their order
    torch.testing.assert_close(x_t, a * x0 + s * eps_p, rtol=0, atol=1e-12)
    torch.testing.assert_close(t_in, 1000.0 * t, rtol=0, atol=1e-9)
    torch.testing.assert_close(y_in, y, rtol=0, atol=0)  # the original labels, in the original order
    # each row i of x_t carries x0_i and the label y_i: take the noise out and x0_i comes back
    torch.testing.assert_close((x_t - s * eps_p) / a, x0, rtol=0, atol=1e-12)
    # loss against the velocity of the re-paired pair, u = d_alpha x0 + d_sigma eps_perm
    u = da * x0 + ds * eps_p
    pred = 0.5 * (a * x0 + s * eps_p) + offsets[y].reshape(-1, 1, 1, 1)
    mse = ((pred - u) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(out["mse"].double(), mse, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["loss"].double(), mse, rtol=1e-6, atol=1e-7)  # loss_weighting=none
    # the noise the network saw is the original rows, each used once (an addition to the checks above)
    used = ((x_t - a * x0) / s).flatten(1)
    close = torch.cdist(used, eps.flatten(1)) < 1e-9  # (B, B)
    assert close.sum(1).eq(1).all() and close.sum(0).eq(1).all()
    torch.testing.assert_close(close.to(torch.int64).argmax(1), perm, rtol=0, atol=0)
    # the caller's tensors are left alone
    assert torch.equal(x0, x0_in) and torch.equal(eps, eps_in)


def test_training_losses_mse_of_a_zero_network_is_the_re_paired_velocity_norm():
    """Linear path, model 0: mse_i = mean((eps_perm_i - x0_i)^2), eps_perm the brute-force OT pairing."""
    B = 7
    x0, eps = draw(B, 6, shape=(3, 2, 2))
    perm, _, _ = brute_force_ot(x0, eps)
    d = FlowMatching(path="linear", prediction="velocity", coupling="ot", discrete_steps=10)
    t = torch.linspace(0.05, 0.95, B, dtype=T64)
    out = d.training_losses(lambda x, tt, y=None: torch.zeros_like(x), x0, t=t, eps=eps)
    expected = ((eps[perm] - x0) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(out["mse"].double(), expected, rtol=1e-6, atol=1e-7)
    as_given = ((eps - x0) ** 2).flatten(1).mean(1)
    assert float((out["mse"].double() - as_given).abs().max()) > 1e-2  # the pairing changed the loss
