"""objective=flow and objective=interpolant end to end: a few training steps on 8x8 digits through train(),
then the checkpoint samples with an ODE and the SDE sampler."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.processes.flow import FlowMatching
from diffusion_lab.samplers import sample
from diffusion_lab.train import train
from diffusion_lab.training.checkpoint import load_module


@pytest.mark.parametrize(
    "objective",
    [["objective=flow"], ["objective=interpolant", "objective.path=gvp", "objective.prediction=score"]],
    ids=["flow", "interpolant_gvp_score"],
)
def test_flow_and_interpolant_train_and_sample(make_cfg, objective):
    cfg = make_cfg(
        *objective,
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
    assert torch.isfinite(torch.tensor(m["train/loss"])) and "val/bpd" not in m
    module, _, _ = load_module(result["last_checkpoint"])
    d = module.diffusion
    assert isinstance(d, FlowMatching) and d._options["path"] == cfg.objective.path
    # SiT's defaults survive the stored config: score in eps units on [1e-3, 1 - 1e-3], velocity on [0, 1]
    score = cfg.objective.prediction == "score"
    assert d.weighting == ("eps" if score else "none")
    assert d.ode_interval() == ((1e-3, 1 - 1e-3) if score else (0.0, 1.0))
    for name, steps in (("heun", 3), ("euler_maruyama", 4), ("dpm_solver", 3)):
        x = sample(module.model.eval(), d, (2, 1, 8, 8), sampler=name, steps=steps)
        assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all() and x.abs().max() <= 1
