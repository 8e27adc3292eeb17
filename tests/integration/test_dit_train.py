"""model=dit_* through the real Hydra config: every objective, class-conditional, a few training steps."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.models import DiT
from diffusion_lab.train import train
from diffusion_lab.training.build import build_module

# dit_tiny's layout at a size that trains in seconds on 8x8 digits (16 tokens of width 32)
DIT = ["model=dit_tiny", "model.patch_size=2", "model.hidden_size=32", "model.depth=1", "model.num_heads=2"]


@pytest.mark.parametrize("objective", ["eps", "x0", "v", "vlb", "hybrid", "edm"])
def test_dit_trains_with_every_objective_and_class_labels(make_cfg, objective):
    cfg = make_cfg(*DIT, f"objective={objective}", "class_conditional=true", "cond_drop_prob=0.2")
    module, n_params = build_module(cfg, (1, 8, 8), num_classes=10)
    model = module.model
    assert isinstance(model, DiT)
    learned = objective in ("vlb", "hybrid")
    assert model.out_channels == (2 if learned else 1), "learned variance doubles the output channels"
    assert model.num_classes == 10 and model.label_embed.num_embeddings == 11  # + the null class
    result = train(cfg)
    assert result["global_step"] == 3
    assert result["num_parameters"] == n_params
    m = result["metrics"]
    assert torch.isfinite(torch.tensor(m["train/loss"])) and torch.isfinite(torch.tensor(m["val/loss"]))
