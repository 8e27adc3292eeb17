"""The training loop in real (tiny) runs: EMA in the checkpoint, the learning rate the optimizer sees, the
noise of a resumed run, classifier-free guidance end to end, and FID during training (sampler, device)."""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, open_dict

import diffusion_lab.samplers as samplers
from diffusion_lab.metrics import MetricSuite
from diffusion_lab.processes.diffusion import GaussianDiffusion
from diffusion_lab.train import train
from diffusion_lab.training.checkpoint import load_module
from diffusion_lab.training.optim import warmup_cosine_factor

CKPT = ["callbacks=default", "callbacks.sample_grid=null", "callbacks.progress_bar=null"]
CONDITIONAL = [
    "model.hidden_dim=128",
    "class_conditional=true",
    "cond_drop_prob=0.1",
    "optimizer.lr=2e-3",
    "lr_scheduler.warmup_steps=20",
    "callbacks.ema=null",
    "callbacks.best_checkpoint=null",
]


def _at(cfg: DictConfig, out: Path) -> DictConfig:
    """The same config with its run directory at ``out`` (for several runs in one test)."""
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def _csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_ema_in_the_checkpoint_is_the_closed_form_of_the_raw_weights(make_cfg, tmp_path):
    """A checkpoint every step holds the raw weights theta_k (current_model_state) and the EMA (state_dict).
    After K updates the EMA is sum_k w_k theta_k with the decays d_n = min(decay, (1 + n) / (10 + n)) of the
    updates n = 1..K-1 (the first update copies theta_1). decay 0.5: warm-up up to n = 7, then 0.5."""
    K, decay = 12, 0.5
    cfg = make_cfg(
        *CKPT,
        *[
            f"trainer.max_steps={K}",
            f"trainer.val_check_interval={K}",
            "callbacks.best_checkpoint=null",
            "callbacks.model_checkpoint.every_n_train_steps=1",
            "callbacks.model_checkpoint.save_top_k=-1",
            "+callbacks.model_checkpoint.filename='s{step:03d}'",
            f"callbacks.ema.decay={decay}",
            "optimizer.lr=1e-2",  # weights that move: each update matters
        ],
    )
    train(cfg)
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("s*.ckpt"))
    assert len(ckpts) == K
    states = [torch.load(c, weights_only=False) for c in ckpts]
    assert [s["global_step"] for s in states] == list(range(1, K + 1))
    d = {n: min(decay, (1 + n) / (10 + n)) for n in range(1, K)}
    weights = [
        (1.0 if k == 1 else 1.0 - d[k - 1]) * np.prod([d[n] for n in range(k, K)]) for k in range(1, K + 1)
    ]
    assert sum(weights) == pytest.approx(1.0)
    ema = states[-1]["state_dict"]
    keys = [k for k in ema if k.startswith("model.") and ema[k].is_floating_point()]
    assert keys
    moved = 0
    for key in keys:
        thetas = [s["current_model_state"][key].double() for s in states]
        expected = sum(w * th for w, th in zip(weights, thetas))
        torch.testing.assert_close(ema[key].double(), expected, rtol=1e-5, atol=1e-6, msg=key)
        moved += not torch.allclose(thetas[-1], expected)
    assert moved, "the raw weights moved, so the EMA differs from the last raw weights"


def test_learning_rate_seen_by_the_optimizer(make_cfg):
    """LearningRateMonitor's lr at every step: base_lr * warmup_cosine_factor(step) (1/warmup at step 0)."""
    steps, warmup, lr = 12, 4, 1e-3
    cfg = make_cfg(
        *[
            "callbacks=default",
            "callbacks.sample_grid=null",
            "callbacks.progress_bar=null",
            "callbacks.ema=null",
            "callbacks.model_checkpoint=null",
            "callbacks.best_checkpoint=null",
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            "trainer.log_every_n_steps=1",
            f"optimizer.lr={lr}",
            "lr_scheduler=warmup_cosine",
            f"lr_scheduler.warmup_steps={warmup}",
            "lr_scheduler.total_steps=8",
            "lr_scheduler.min_lr_ratio=0.1",
        ],
    )
    result = train(cfg)
    rows = _csv_rows(Path(result["output_dir"]))
    col = next(c for c in rows[0] if c.startswith("lr-"))
    seen = {int(r["step"]): float(r[col]) for r in rows if r.get(col)}
    assert sorted(seen) == list(range(steps))
    for step, value in seen.items():
        assert value == pytest.approx(lr * warmup_cosine_factor(step, warmup, 8, 0.1)), f"step {step}"
    assert seen[0] == pytest.approx(lr / warmup) and seen[11] == pytest.approx(0.1 * lr)


def _record_training_noise(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record the (t, eps) of every training loss (gradients on; validation runs without them)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = GaussianDiffusion.training_losses

    def record(self, model, x0, t, eps, **kw):
        if torch.is_grad_enabled():
            seen.append((t.clone(), eps.clone()))
        return original(self, model, x0, t=t, eps=eps, **kw)

    monkeypatch.setattr(GaussianDiffusion, "training_losses", record)
    return seen


def test_each_step_draws_new_noise_and_a_resumed_run_redraws_it(make_cfg, tmp_path, monkeypatch):
    """6 steps straight; 3 steps, then a resume from the step-3 checkpoint to step 6: the resumed steps draw
    the same t and eps as the straight run, and no two steps draw the same."""
    seen = _record_training_noise(monkeypatch)
    base = [*CKPT, "callbacks.ema=null", "callbacks.best_checkpoint=null", "trainer.val_check_interval=100"]
    train(_at(make_cfg(*base, "trainer.max_steps=6"), tmp_path / "a"))
    straight = list(seen)
    seen.clear()
    every3 = "callbacks.model_checkpoint.every_n_train_steps=3"
    first = train(_at(make_cfg(*base, "trainer.max_steps=3", every3), tmp_path / "b"))
    resume = f"ckpt_path={first['last_checkpoint']}"
    train(_at(make_cfg(*base, "trainer.max_steps=6", resume), tmp_path / "c"))
    resumed = list(seen)
    assert len(straight) == 6 and len(resumed) == 6
    for k in range(6):
        t, eps = straight[k]
        assert torch.equal(t, resumed[k][0]) and torch.equal(eps, resumed[k][1]), f"step {k} differs"
        for j in range(k):
            assert not torch.equal(eps, straight[j][1]), f"steps {j} and {k} draw the same eps"
            assert not torch.equal(t, straight[j][0]), f"steps {j} and {k} draw the same t"


@pytest.fixture(scope="module")
def digit_predictor():
    """3-nearest-neighbours on the 8x8 digits: uint8 (N, 1, 8, 8) -> predicted labels."""
    from sklearn.datasets import load_digits
    from sklearn.neighbors import KNeighborsClassifier

    d = load_digits()
    x = np.round(d.images * (255 / 16)).reshape(len(d.images), -1) / 255.0
    knn = KNeighborsClassifier(n_neighbors=3).fit(x, d.target)
    return lambda u8: knn.predict(u8.reshape(u8.shape[0], -1).numpy() / 255.0)


@pytest.mark.parametrize("seed", [0])
def test_class_conditional_training_and_guided_sampling(make_cfg, digit_predictor, seed):
    """300 steps of a class-conditional MLP on 8x8 digits (label drop 0.1): samples asked for class c are
    classified as c at chance level without the label (guidance 0), more often with it (guidance 1), and
    far more often with guidance 3. Measured over seeds 0-4: 0.10-0.14 / 0.33-0.39 / 0.81-0.85 of 500."""
    cfg = make_cfg(
        *CKPT, *CONDITIONAL, f"seed={seed}", "trainer.max_steps=300", "trainer.val_check_interval=300"
    )
    result = train(cfg)
    module, _, _ = load_module(result["last_checkpoint"])
    module.eval()
    n = 500
    y = torch.arange(n) % 10
    accuracy = {}
    for scale in (0.0, 1.0, 3.0):
        with torch.no_grad():
            x = samplers.sample(
                module.model,
                module.diffusion,
                (n, 1, 8, 8),
                sampler="ddim",
                steps=20,
                seed=1,
                y=y,
                guidance_scale=scale,
            )
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        accuracy[scale] = float((digit_predictor(u8) == y.numpy()).mean())
    assert accuracy[0.0] < 0.25, accuracy  # the null class: 10% expected
    assert accuracy[1.0] > accuracy[0.0] + 0.1, accuracy
    assert accuracy[3.0] > accuracy[1.0] + 0.2 and accuracy[3.0] > 0.6, accuracy


def _spy_samplers(monkeypatch) -> dict[str, list[int]]:
    """Count the batch sizes each sampler function is called with (the configs resolve them at build time)."""
    calls: dict[str, list[int]] = {"ddpm_sample": [], "ddim_sample": []}
    for name in calls:
        original = getattr(samplers, name)

        @functools.wraps(original)
        def spy(model_fn, diffusion, x_T, *a, _name=name, _original=original, **kw):
            calls[_name].append(x_T.shape[0])
            return _original(model_fn, diffusion, x_T, *a, **kw)

        monkeypatch.setattr(samplers, name, spy)
    return calls


@pytest.mark.parametrize(
    "overrides, used",
    [
        (["sampler=ddim", "sampler.steps=3"], "ddim_sample"),
        (["sampler=ddpm", "sampler.steps=3"], "ddpm_sample"),
        (["sampler=ddpm", "+sampler@metrics.sampler=ddim", "metrics.sampler.steps=2"], "ddim_sample"),
    ],
    ids=["run-ddim", "run-ddpm", "override-ddim"],
)
def test_fid_during_training_uses_the_run_sampler_on_the_module_device(
    make_cfg, monkeypatch, digits_classifier, overrides, used
):
    """FID samples come from the run's sampler (the sampler= config) unless metrics.sampler gives a whole
    sampler config; the metric suite is moved to the module's device before it computes (it starts on the
    meta device here, where nothing can be computed, so a suite left where it was fails)."""
    calls = _spy_samplers(monkeypatch)
    devices = []
    from_config, compute = MetricSuite.from_config.__func__, MetricSuite.compute

    def spy_compute(self, *a, **kw):
        devices.append(self.device)
        return compute(self, *a, **kw)

    monkeypatch.setattr(
        MetricSuite, "from_config", classmethod(lambda cls, c, device="meta": from_config(cls, c, device))
    )
    monkeypatch.setattr(MetricSuite, "compute", spy_compute)
    cfg = make_cfg(
        *CKPT,
        *overrides,
        *[
            "trainer.max_steps=2",
            "metrics.every_n_steps=100",
            "metrics.n=12",
            f"metrics.classifier_path={digits_classifier}",
            "metrics.names=[fid_classifier]",
        ],
    )
    result = train(cfg)
    assert result["metrics"]["val/fid_classifier"] > 0
    assert calls[used] == [12], calls  # one batch of n samples, at the end of training
    assert not calls["ddpm_sample" if used == "ddim_sample" else "ddim_sample"], calls
    assert devices == [torch.device("cpu")], "the suite computes on the module's device"
