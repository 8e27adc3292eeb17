"""One default per setting: the run config, ``build_module``'s fallback and ``DiffusionModule`` agree."""

from __future__ import annotations

import inspect

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from diffusion_lab.train import CONF_DIR
from diffusion_lab.training.build import build_module
from diffusion_lab.training.lit_module import DiffusionModule

TINY = ["dataset=digits", "dataset.image_size=8", "model=mlp", "model.hidden_dim=16", "model.num_layers=2"]
TINY += ["trainer.precision=32"]  # a literal: the config resolves without the commands' resolvers


def _module_default(name: str):
    return inspect.signature(DiffusionModule.__init__).parameters[name].default


def _default_config(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)  # the run config interpolates ${hydra:...}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def test_cond_drop_prob_has_one_default():
    """conf/config.yaml, build_module (a config without the key, e.g. an older run's) and the module say the
    same probability of dropping the label."""
    expected = _module_default("cond_drop_prob")
    cfg = _default_config(*TINY, "class_conditional=true")
    assert cfg.cond_drop_prob == expected, "conf/config.yaml disagrees with DiffusionModule"
    with open_dict(cfg):
        del cfg["cond_drop_prob"]
    module, _ = build_module(cfg, (1, 8, 8), num_classes=10)
    assert module.hparams.cond_drop_prob == expected, "build_module's fallback disagrees with DiffusionModule"
