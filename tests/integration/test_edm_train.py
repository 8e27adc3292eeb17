"""objective=edm end to end: a few training steps on the tiny setup, then the sample command with Heun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from diffusion_lab.processes.edm import EDMDiffusion
from diffusion_lab.train import train
from diffusion_lab.training.checkpoint import load_module


def test_edm_trains_and_its_checkpoint_samples_with_heun(make_cfg, tmp_path):
    cfg = make_cfg(
        "objective=edm",
        "callbacks=default",
        "callbacks.sample_grid=null",
        "callbacks.progress_bar=null",
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "sampler=heun",
        "sampler.steps=3",
    )
    result = train(cfg)
    assert result["global_step"] == 3
    m = result["metrics"]
    assert torch.isfinite(torch.tensor(m["train/loss"])) and torch.isfinite(torch.tensor(m["val/loss"]))
    assert "val/bpd" not in m  # no bits/dim for the continuous family
    ckpt = Path(result["last_checkpoint"])
    module, _, _ = load_module(ckpt)
    assert isinstance(module.diffusion, EDMDiffusion)

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("HYDRA_FULL_ERROR", None)
    out = tmp_path / "heun"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffusion_lab.sample",
            f"ckpt={ckpt}",
            "n=4",
            "sampler=heun",
            "sampler.steps=3",
            f"out={out}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "5 network evaluations" in r.stdout  # Heun: 2 x 3 - 1
    samples = np.load(out / "samples.npz")["samples"]
    assert samples.shape == (4, 1, 8, 8) and samples.dtype == np.uint8
