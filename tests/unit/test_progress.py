"""Progress bars: drawn on a terminal (or with DIFFUSION_LAB_PROGRESS=1), silent in logs and CI; the training
bar counts optimizer steps over the whole run."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from diffusion_lab.evaluate import exact_bpd
from diffusion_lab.metrics.fid import iter_batches
from diffusion_lab.metrics.train_classifier import train_classifier
from diffusion_lab.models import MLP
from diffusion_lab.processes.diffusion import GaussianDiffusion
from diffusion_lab.processes.schedules import make_schedule
from diffusion_lab.sample import generate
from diffusion_lab.samplers import ddim_sample
from diffusion_lab.training.lit_module import DiffusionModule
from diffusion_lab.training.progress_bar import TRAIN_DESCRIPTION, StepProgressBar
from diffusion_lab.utils import progress
from diffusion_lab.utils.progress import track


@pytest.fixture
def terminal(monkeypatch):
    """Bars forced on, and rich told the captured stream is a terminal (so it draws frames)."""
    monkeypatch.setenv("DIFFUSION_LAB_PROGRESS", "1")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")


@pytest.fixture
def no_terminal(monkeypatch):
    """The situation of a log file or CI: no flag, stderr not a terminal (pytest captures it)."""
    monkeypatch.delenv("DIFFUSION_LAB_PROGRESS", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.delenv("CI", raising=False)


def test_track_draws_a_bar_on_a_terminal(terminal, capfd):
    assert list(track(range(3), "counting")) == [0, 1, 2]
    err = capfd.readouterr().err
    assert "counting" in err and "/3" in err and "eta" in err


def test_progress_flag_draws_without_a_terminal(no_terminal, monkeypatch, capfd):
    """DIFFUSION_LAB_PROGRESS=1 alone (stderr a pipe, e.g. `| tee log`) still draws the bar."""
    monkeypatch.setenv("DIFFUSION_LAB_PROGRESS", "1")
    assert list(track(range(3), "counting")) == [0, 1, 2]
    err = capfd.readouterr().err
    assert "counting" in err and "3/3" in err


def test_track_is_silent_without_a_terminal(no_terminal, capfd):
    assert list(track(range(3), "counting")) == [0, 1, 2]
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# ------------------------------------------------------------------------------------ the training bar


class _InnerLoop(pl.Callback):
    """Runs a tracked loop inside training, as the sample-grid and FID callbacks do."""

    def on_train_batch_end(self, *args, **kwargs):
        list(track(range(2), "inner loop"))


def _fit(bar: StepProgressBar, **trainer_kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[bar, _InnerLoop()],
        **trainer_kwargs,
    )
    trainer.fit(BoringModel())
    return trainer


def test_training_bar_counts_steps_up_to_max_steps(terminal, capfd):
    """5 steps over 3 short epochs (2 batches each): one bar, total 5 = max_steps, not 2 per epoch."""
    bar = StepProgressBar()
    trainer = _fit(bar, max_steps=5, limit_train_batches=2, limit_val_batches=1, val_check_interval=2)
    assert trainer.current_epoch >= 2, "the run spans several epochs"
    task = bar.train_progress_bar
    assert task.description == TRAIN_DESCRIPTION
    assert task.total == 5 and task.completed == 5
    assert bar.val_progress_bar.total == 1, "validation keeps its own bar"
    err = capfd.readouterr().err
    assert f"{TRAIN_DESCRIPTION}" in err and "5/5" in err
    assert "inner loop" not in err, "loops inside training stay quiet under the training bar"
    assert progress._active == 0, "the training bar releases track() at the end"


def test_training_bar_total_without_max_steps_is_epochs_times_batches(terminal):
    bar = StepProgressBar()
    _fit(bar, max_epochs=2, limit_train_batches=3, limit_val_batches=0)
    assert bar.train_progress_bar.total == 6 and bar.train_progress_bar.completed == 6


def test_training_bar_is_silent_without_a_terminal(no_terminal, capfd):
    bar = StepProgressBar()
    _fit(bar, max_steps=2, limit_train_batches=2, limit_val_batches=0)
    assert bar.is_disabled and bar.progress is None
    assert TRAIN_DESCRIPTION not in capfd.readouterr().err


# ------------------------------------------------------------------------------- the long loops


@pytest.fixture(scope="module")
def tiny_module() -> DiffusionModule:
    diffusion = GaussianDiffusion(make_schedule("cosine", timesteps=10))
    model = MLP(in_channels=1, out_channels=1, image_size=4, hidden_dim=16, num_layers=1)
    return DiffusionModule(
        model, diffusion, optimizer=partial(torch.optim.SGD, lr=0.1), image_shape=(1, 4, 4)
    )


def _loops(module: DiffusionModule) -> None:
    images = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
    labels = torch.arange(6) % 2
    list(iter_batches(images, 2, "cpu", "feature batches"))
    train_classifier(images, labels, images, labels, epochs=1, batch_size=2, width=4, feature_dim=8, log=None)
    generate(module, partial(ddim_sample, steps=2), n=4, batch_size=2)
    exact_bpd(module, images[:4], labels[:4], batch_size=2, device="cpu")


def test_long_loops_show_bars_on_a_terminal(terminal, capfd, tiny_module):
    _loops(tiny_module)
    err = capfd.readouterr().err
    for description in ("feature batches", "classifier epoch 1/1", "sampling 4 images", "bits/dim"):
        assert description in err, f"no bar for {description}"


def test_long_loops_are_silent_without_a_terminal(no_terminal, capfd, tiny_module):
    _loops(tiny_module)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
