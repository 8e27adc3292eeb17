"""bits/dim from the probability-flow ODE on real (tiny) checkpoints of every family, through evaluate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import FAST, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from diffusion_lab.evaluate import evaluate
from diffusion_lab.train import CONF_DIR, train

CHECKPOINTING = [
    "callbacks=default",
    "callbacks.sample_grid=null",
    "callbacks.progress_bar=null",
    "callbacks.model_checkpoint.every_n_train_steps=3",
]


@pytest.mark.parametrize(
    "family",
    [
        ["objective=eps"],
        ["objective=edm"],
        ["objective=flow"],
        ["objective=interpolant", "objective.path=gvp", "objective.prediction=noise"],
    ],
    ids=["ddpm", "edm", "flow", "sit_gvp_noise"],
)
def test_bpd_ode_for_every_family(tmp_path, family):
    ckpt = Path(train(compose_config(tmp_path, FAST + CHECKPOINTING + family))["last_checkpoint"])
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "evaluate",
            [
                f"ckpt={ckpt}",
                "metric_names=[bpd_ode]",
                "bpd_n=4",
                "bpd_batch_size=4",
                "bpd_ode.steps=4",
                "bpd_ode.method=heun",
                f"out={tmp_path / 'eval.json'}",
            ],
        )
    results = evaluate(cfg)
    value = results["bpd_ode"]
    value = value["mean"] if isinstance(value, dict) else value
    # 3 training steps on 8x8 digits: a finite, positive number of bits per dimension
    assert math.isfinite(value) and value > 0
