"""close_loggers finishes the wandb run that the logger started, and starts none where it started none."""

from __future__ import annotations

import pytest

from diffusion_lab.training.loggers import close_loggers


def test_close_loggers_finishes_the_wandb_run_and_starts_none(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    wandb.finish()
    close_loggers([WandbLogger(save_dir=str(tmp_path), offline=True)])  # never logged: no run to finish
    assert wandb.run is None and not list(tmp_path.glob("wandb/offline-run-*")), "no run was started"

    used = WandbLogger(save_dir=str(tmp_path), offline=True)
    used.experiment.log({"x": 1})
    assert wandb.run is not None
    close_loggers([used])
    assert wandb.run is None, "the run was finished: the next job of a multirun starts its own"
    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == 1
