"""A checkpoint written before the package was split into processes / training / utils still samples.

``tests/fixtures/pre_layout_mlp8.ckpt`` was trained (3 steps, 8x8 digits, MLP) by the flat-layout code,
whose stored config names ``diffusion_lab.schedules.make_schedule`` and
``diffusion_lab.diffusion.GaussianDiffusion``;
``pre_layout_mlp8_ddim10_seed0.pt`` holds the 4 images that code drew from it with DDIM, 10 steps, seed 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import run_command
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_lab.sample import generate
from diffusion_lab.training.checkpoint import load_module, read_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
OLD = FIXTURES / "pre_layout_mlp8.ckpt"


def test_old_checkpoint_names_the_old_modules():
    stored = read_checkpoint(OLD)["hyper_parameters"]["config"]
    assert stored["schedule"]["_target_"] == "diffusion_lab.schedules.make_schedule"
    assert stored["objective"]["_target_"] == "diffusion_lab.diffusion.GaussianDiffusion"


def test_old_checkpoint_samples_the_same_images():
    ref = torch.load(FIXTURES / "pre_layout_mlp8_ddim10_seed0.pt", weights_only=True)
    module, cfg, _ = load_module(OLD)
    assert cfg.schedule._target_ == "diffusion_lab.processes.schedules.make_schedule"
    sampler = instantiate(
        OmegaConf.create({"_target_": "diffusion_lab.samplers.ddim_sample", "_partial_": True, "steps": 10})
    )
    images, _, nfe = generate(module, sampler, n=4, seed=0)
    assert nfe == 10
    assert torch.equal(images, ref["images"])


def test_old_checkpoint_samples_from_the_command_line(tmp_path):
    r = run_command(
        "diffusion_lab.sample",
        [f"ckpt={OLD}", "n=4", "sampler=ddim", "sampler.steps=10", f"out={tmp_path / 'out'}"],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert list((tmp_path / "out").glob("*.png"))
