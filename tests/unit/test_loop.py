"""The training loop around the math: EMA, per-step noise, learning rate, label drop, sampling callbacks.

Each test here fails on a one-line bug that the math tests cannot see: the EMA weighting the new weights by
``decay``, the per-step generator ignoring the step, the warm-up starting at 0, the label drop inverted.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from diffusion_lab.models import MLP
from diffusion_lab.processes.diffusion import GaussianDiffusion
from diffusion_lab.processes.schedules import make_schedule
from diffusion_lab.samplers import ddim_sample
from diffusion_lab.training.callbacks import EMA, SampleGrid, SampleQuality, _ema_update
from diffusion_lab.training.lit_module import DiffusionModule
from diffusion_lab.training.optim import warmup_cosine, warmup_cosine_factor
from diffusion_lab.utils.media import to_uint8, to_unit_range

# ------------------------------------------------------------------------------------------------ EMA


def _decay(n: int, decay: float, warmup: bool) -> float:
    """The decay of the update made with ``num_averaged = n``: min(decay, (1 + n) / (10 + n)) with warm-up."""
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


def _ema_closed_form(thetas: list[torch.Tensor], decay: float, warmup: bool) -> torch.Tensor:
    """EMA after K updates with weights theta_1..theta_K, written as one weighted sum.

    AveragedModel copies theta_1 at its first update; the update with num_averaged = n (n = 1..K-1) is
    e <- d_n e + (1 - d_n) theta_{n+1}. Unrolled:  e_K = sum_k w_k theta_k  with
    w_1 = prod_{n=1}^{K-1} d_n  and  w_k = (1 - d_{k-1}) prod_{n=k}^{K-1} d_n  for k >= 2.
    """
    K = len(thetas)
    d = {n: _decay(n, decay, warmup) for n in range(1, K)}
    out = torch.zeros_like(thetas[0], dtype=torch.float64)
    for k in range(1, K + 1):
        w = (1.0 if k == 1 else 1.0 - d[k - 1]) * math.prod(d[n] for n in range(k, K))
        out += w * thetas[k - 1].double()
    return out


def test_ema_update_one_step_weights():
    """One update by hand: e <- d e + (1 - d) theta, with the warm-up decay at small n."""
    e, p = torch.tensor([0.0, 10.0]), torch.tensor([1.0, 0.0])
    _ema_update(0.99, warmup=False)([e], [p], torch.tensor(5))
    assert torch.allclose(e, torch.tensor([0.01, 9.9]))
    e = torch.tensor([0.0, 10.0])
    _ema_update(0.99, warmup=True)([e], [p], torch.tensor(0))  # d = min(0.99, 1/10) = 0.1
    assert torch.allclose(e, torch.tensor([0.9, 1.0]))
    e = torch.tensor([0.0, 10.0])
    _ema_update(0.5, warmup=True)([e], [p], torch.tensor(1000))  # d = min(0.5, 1001/1010) = 0.5
    assert torch.allclose(e, torch.tensor([0.5, 5.0]))
    counter = torch.tensor([3])  # integer buffers are copied, not averaged
    _ema_update(0.99, warmup=False)([counter], [torch.tensor([7])], torch.tensor(5))
    assert counter.tolist() == [7]


@pytest.mark.parametrize("decay, warmup", [(0.9, True), (0.9, False), (0.999, True)])
def test_ema_matches_closed_form_after_n_updates(decay, warmup):
    """100 updates through torch's AveragedModel (as Lightning runs it): the warm-up decay
    (1 + n) / (10 + n) stays below 0.9 until n = 80, so both regimes are crossed."""
    net = nn.Linear(3, 2)
    net.register_buffer("steps", torch.zeros((), dtype=torch.long))
    avg = AveragedModel(net, multi_avg_fn=_ema_update(decay, warmup), use_buffers=True)
    g = torch.Generator().manual_seed(0)
    thetas = []
    for k in range(1, 101):
        with torch.no_grad():  # a drifting weight: the EMA lags behind it by about d / (1 - d) steps
            net.weight.copy_(k + torch.randn(net.weight.shape, generator=g))
            net.steps.fill_(k)
        thetas.append(net.weight.detach().clone())
        avg.update_parameters(net)
    expected = _ema_closed_form(thetas, decay, warmup)
    assert torch.allclose(avg.module.weight.double(), expected, rtol=1e-5, atol=1e-4)
    assert int(avg.module.steps) == 100
    if (decay, warmup) == (0.9, False):  # e_100 ~ 100 - 0.9 / 0.1: the average lags 9 steps behind
        assert abs(avg.module.weight.mean().item() - 91.0) < 0.5


def test_ema_callback_refuses_a_bad_decay():
    with pytest.raises(ValueError, match="EMA decay must lie in"):
        EMA(decay=1.0)


def test_ema_callback_update_is_averaged_models_without_reading_the_count_back():
    """The callback's update (count kept on the host) gives AveragedModel.update_parameters' weights bit for
    bit, keeps the stored n_averaged tensor counting, and reads no device value (the count was a host wait per
    step); a resumed callback takes its count from the checkpoint's tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Reads.n += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))  # float and integer buffers
    ema = EMA(decay=0.9, warmup=True)
    ema._average_model = AveragedModel(net, multi_avg_fn=_ema_update(0.9, True), use_buffers=True)
    reference = AveragedModel(net, multi_avg_fn=_ema_update(0.9, True), use_buffers=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        net(torch.randn(8, 3, generator=g))  # moves the running statistics and num_batches_tracked
        with Reads():
            ema._update_average(net)
        reference.update_parameters(net)
    assert Reads.n == 0
    for (name, a), b in zip(ema._average_model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert int(ema._average_model.n_averaged) == 5 and ema._num_averaged == 5

    resumed = EMA(decay=0.9, warmup=True)
    resumed._average_model = AveragedModel(net, multi_avg_fn=_ema_update(0.9, True), use_buffers=True)
    state = {"state_dict": net.state_dict(), "current_model_state": net.state_dict()}
    state["averaging_state"] = {"n_averaged": ema._average_model.n_averaged.clone()}
    resumed.on_load_checkpoint(mock.Mock(), net, state)
    assert resumed._num_averaged == 5


# ------------------------------------------------------------------------------------ module helpers


def _module(class_conditional: bool = False, cond_drop_prob: float = 0.1, seed: int = 0, **kw):
    model = MLP(1, 1, 8, hidden_dim=16, num_layers=1, num_classes=10 if class_conditional else None)
    diffusion = GaussianDiffusion(make_schedule("linear", timesteps=50))
    return DiffusionModule(
        model=model,
        diffusion=diffusion,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        image_shape=(1, 8, 8),
        num_classes=10,
        class_conditional=class_conditional,
        cond_drop_prob=cond_drop_prob,
        seed=seed,
        **kw,
    )


def _noise_at(module: DiffusionModule, step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The (t, eps) that training_step draws at optimizer step ``step`` on ``rank``."""
    with (
        mock.patch.object(DiffusionModule, "global_step", new_callable=mock.PropertyMock, return_value=step),
        mock.patch.object(DiffusionModule, "global_rank", new_callable=mock.PropertyMock, return_value=rank),
    ):
        g = module._step_generator(stream=0)
    t = module.diffusion.sample_timesteps(64, generator=g)
    eps = torch.randn((64, 1, 8, 8), generator=g)
    return t, eps


# ---------------------------------------------------------------------------------- per-step noise


def test_step_noise_differs_between_steps():
    module = _module()
    draws = [_noise_at(module, step) for step in range(6)]
    for i in range(len(draws)):
        for j in range(i + 1, len(draws)):
            assert not torch.equal(draws[i][1], draws[j][1]), f"steps {i} and {j} draw the same eps"
            assert not torch.equal(draws[i][0], draws[j][0]), f"steps {i} and {j} draw the same t"


def test_step_noise_is_a_function_of_seed_step_and_rank():
    """A resumed run (a new module, the same seed, the same step) redraws exactly the same t and eps."""
    a, b, other_seed = _module(seed=3), _module(seed=3), _module(seed=4)
    for step in (0, 7, 1234):
        ta, ea = _noise_at(a, step)
        tb, eb = _noise_at(b, step)
        assert torch.equal(ta, tb) and torch.equal(ea, eb)
        assert not torch.equal(ea, _noise_at(other_seed, step)[1])
        assert not torch.equal(ea, _noise_at(a, step, rank=1)[1]), "each DDP rank draws its own noise"


def test_training_step_uses_the_step_noise():
    """training_step feeds the step generator's t and eps to the loss (and its labels drop with it)."""
    module = _module(class_conditional=True)
    seen = []

    def record(model, x0, t, eps, y=None):
        seen.append((t.clone(), eps.clone()))
        return {"loss": (eps**2).mean((1, 2, 3))}

    batch = (torch.zeros(64, 1, 8, 8), torch.zeros(64, dtype=torch.long))
    with mock.patch.object(module.diffusion, "training_losses", record), mock.patch.object(module, "log"):
        for step in (0, 1):
            with mock.patch.object(
                DiffusionModule, "global_step", new_callable=mock.PropertyMock, return_value=step
            ):
                module.training_step(batch, 0)
    for step in (0, 1):
        t, eps = _noise_at(module, step)
        assert torch.equal(seen[step][0], t) and torch.equal(seen[step][1], eps)


# ---------------------------------------------------------------------------------- learning rate


def test_warmup_cosine_factor_at_known_steps():
    """Warm-up 10 steps, cosine to 0.1 at step 110: 1/10 at step 0 (not 0), 1 at the end of the warm-up,
    0.55 halfway down the cosine, 0.1 at the end and after it."""
    f = functools.partial(warmup_cosine_factor, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(120)]
    assert all(a < b for a, b in zip(values[:10], values[1:10])), "warm-up rises"
    assert all(a >= b for a, b in zip(values[10:], values[11:])), "then decays"
    assert warmup_cosine_factor(0, 0, None, 0.1) == 1.0, "no warm-up, no end: constant"
    assert warmup_cosine_factor(5000, 1000, None, 1.0) == 1.0


def test_warmup_cosine_scheduler_sets_the_optimizer_lr():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=12, min_lr_ratio=0.25)
    seen = []
    for _ in range(15):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [2.0 * warmup_cosine_factor(s, 4, 12, 0.25) for s in range(15)]
    assert seen == pytest.approx(expected)
    assert seen[0] == pytest.approx(0.5) and seen[-1] == pytest.approx(0.5)
    # Trainer(max_steps=-1): no known end, so no decay
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=-1)
    for _ in range(50):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 1.0


# ------------------------------------------------------------------------------------- label drop


def test_label_drop_rate_and_null_class():
    """About cond_drop_prob of the labels become the null class num_classes; the rest are unchanged."""
    p, n = 0.1, 100_000
    module = _module(class_conditional=True, cond_drop_prob=p)
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    out = module._labels(y, drop=True, generator=torch.Generator().manual_seed(1))
    dropped = out != y
    rate = dropped.float().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n), f"drop rate {rate:.4f}, expected {p}"
    assert (out[dropped] == 10).all(), "dropped labels are the null class num_classes"
    assert torch.equal(out[~dropped], y[~dropped])
    for p in (0.0, 0.5, 0.9):  # the rate follows the setting, not 1 - p
        m = _module(class_conditional=True, cond_drop_prob=p)
        r = (m._labels(y, drop=True, generator=torch.Generator().manual_seed(2)) == 10).float().mean().item()
        assert abs(r - p) < 0.01, f"cond_drop_prob={p}: drop rate {r:.4f}"


def test_no_label_drop_at_validation_or_without_conditioning():
    y = torch.randint(0, 10, (1000,))
    module = _module(class_conditional=True, cond_drop_prob=0.5)
    assert torch.equal(module._labels(y, drop=False), y)
    assert _module(class_conditional=False)._labels(y, drop=True) is None
    seen = []

    def record(model, x0, t, eps, y=None):
        seen.append(y)
        return {"loss": torch.zeros(x0.shape[0])}

    batch = (torch.zeros(1000, 1, 8, 8), y)
    with (
        mock.patch.object(module.diffusion, "training_losses", record),
        mock.patch.object(module.diffusion, "bpd_estimate", lambda *a, **k: torch.zeros(1000)),
        mock.patch.object(module, "log"),
    ):
        module.validation_step(batch, 0)
        module.training_step(batch, 0)
    assert torch.equal(seen[0], y), "validation sees every label"
    assert 400 < int((seen[1] == 10).sum()) < 600, "training drops about half of them"


# ------------------------------------------------------------------------------- sampling callbacks


def _fake_trainer(world_size: int = 1, rank: int = 0, callbacks=()):
    return SimpleNamespace(world_size=world_size, global_rank=rank, callbacks=list(callbacks))


class _CountingSampler:
    """A sampler partial stand-in: records each call, returns x_T (so the samples show the noise drawn)."""

    def __init__(self):
        self.calls = []

    def __call__(self, model_fn, diffusion, x_T, *, generator, y=None, callback=None):
        self.calls.append((x_T.shape[0], None if y is None else y.clone(), model_fn.training))
        return x_T.clamp(-1, 1)


def test_sampling_callbacks_use_the_runs_sampler_unless_given_one():
    module = _module(class_conditional=True)
    module.sampler = run_sampler = _CountingSampler()
    module.train()
    grid = SampleGrid(num_samples=10, animation=False, seed=5)
    a = grid.draw(_fake_trainer(), module, 10, batch_size=4)
    assert a.shape == (10, 1, 8, 8)
    assert [c[0] for c in run_sampler.calls] == [4, 4, 2], "the run's sampler, in batches"
    assert not any(c[2] for c in run_sampler.calls), "sampling runs in eval mode"
    assert module.training, "and training mode comes back"
    labels = torch.cat([c[1] for c in run_sampler.calls])
    assert labels.tolist() == [i % 10 for i in range(10)]
    b = grid.draw(_fake_trainer(), module, 10, batch_size=4)
    assert torch.equal(a, b), "the same seed draws the same samples at every evaluation"
    other = _CountingSampler()
    SampleGrid(sampler=other, seed=5).draw(_fake_trainer(), module, 3)
    assert len(other.calls) == 1 and len(run_sampler.calls) == 6, "an explicit sampler overrides the run's"
    rank1 = grid.draw(_fake_trainer(world_size=1, rank=1), module, 10, batch_size=4)
    assert not torch.equal(a, rank1), "another rank draws other samples (seed + rank)"


def test_sampling_callback_refuses_a_sampler_name():
    with pytest.raises(ValueError, match=r"sampler must be a sampler config.*\+sampler@metrics.sampler"):
        SampleQuality({"names": ["fid_classifier"]}, sampler="ddim")


def test_sampling_callback_runs_a_real_sampler_partial():
    module = _module()
    module.sampler = functools.partial(ddim_sample, steps=3)
    x = SampleGrid(seed=0).draw(_fake_trainer(), module, 5)
    assert x.shape == (5, 1, 8, 8) and torch.isfinite(x).all()


# -------------------------------------------------------------------------------------- pixel ranges


def test_to_uint8_and_to_unit_range():
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_unit_range(u8)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x, value_range=(-1, 1)), u8), "the pair round-trips every pixel value"
    assert torch.equal(to_uint8(u8.float(), value_range=(0, 255)), u8)
    assert to_uint8(torch.tensor([-3.0, 0.0, 3.0]), value_range=(-1, 1)).tolist() == [0, 128, 255]
    assert to_uint8(torch.tensor([-0.6, 254.6, 300.0]), value_range=(0, 255)).tolist() == [0, 255, 255]
    with pytest.raises(TypeError):
        to_uint8(x)  # the input range is always named
    with pytest.raises(ValueError, match="high > low"):
        to_uint8(x, value_range=(1, -1))
