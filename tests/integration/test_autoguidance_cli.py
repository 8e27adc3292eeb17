"""guidance=auto in the sample command, on a real (tiny) checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from diffusion_lab.sample import CONF_DIR, _sample


def _sample_cfg(ckpt, out, *overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            "sample",
            overrides=[
                f"ckpt={ckpt}",
                "n=6",
                "sampler=ddim",
                "sampler.steps=5",
                "device=cpu",
                f"out={out}",
                *overrides,
            ],
        )


def _samples(out):
    return np.load(out / "samples.npz")["samples"]


def test_auto_guidance_weight_one_is_unguided_and_other_weights_guide(tiny_checkpoint, tmp_path):
    _sample(_sample_cfg(tiny_checkpoint, tmp_path / "plain"))
    auto = ["guidance=auto", f"guide_ckpt={tiny_checkpoint}", "guide_ema=false"]
    _sample(_sample_cfg(tiny_checkpoint, tmp_path / "w1", *auto, "guide_weight=1"))
    _sample(_sample_cfg(tiny_checkpoint, tmp_path / "w3", *auto, "guide_weight=3"))
    assert np.array_equal(_samples(tmp_path / "plain"), _samples(tmp_path / "w1"))
    assert not np.array_equal(_samples(tmp_path / "plain"), _samples(tmp_path / "w3"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["guidance=auto"], "guidance=auto needs the guiding model"),
        (["guide_ckpt=x.ckpt"], "add guidance=auto"),
        (["guidance=cfg", "guide_ckpt=x.ckpt"], "guidance='cfg' is not valid"),
    ],
)
def test_auto_guidance_bad_options_are_refused(tiny_checkpoint, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _sample(_sample_cfg(tiny_checkpoint, tmp_path / "x", *overrides))
