"""guidance=auto in the sample command, on a real (tiny) checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FAST, TINY_RUN, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from diffusion_lab.sample import CONF_DIR, _sample
from diffusion_lab.train import train


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


@pytest.fixture(scope="module")
def flow_checkpoints(tmp_path_factory):
    """Three tiny flow runs (30 steps, as ``tiny_checkpoint``): the model, a guide trained differently
    (uniform t, another schedule group, t_eps, discrete view), and a noise-predicting one."""
    runs = {
        "main": ["objective=flow"],
        "compatible": [
            "objective=interpolant",
            "schedule=cosine",
            "objective.t_eps=0.001",
            "objective.discrete_steps=100",
        ],
        "noise": ["objective=interpolant", "objective.prediction=noise"],
    }
    out = {}
    for name, overrides in runs.items():
        root = tmp_path_factory.mktemp(f"flow_{name}")
        cfg = compose_config(root, FAST + overrides + TINY_RUN)
        out[name] = train(cfg)["last_checkpoint"]
    return out


def test_a_flow_guide_is_checked_on_what_its_output_means(flow_checkpoints, tmp_path):
    """A guide trained with another time density, schedule group, t_eps and discrete view guides a flow model;
    a noise-predicting guide is refused in one line naming the prediction (and nothing else)."""
    main = flow_checkpoints["main"]
    _sample(_sample_cfg(main, tmp_path / "plain"))
    auto = ["guidance=auto", "guide_ema=false", "guide_weight=3"]
    _sample(_sample_cfg(main, tmp_path / "w3", *auto, f"guide_ckpt={flow_checkpoints['compatible']}"))
    assert not np.array_equal(_samples(tmp_path / "plain"), _samples(tmp_path / "w3"))
    noise = flow_checkpoints["noise"]
    with pytest.raises(ValueError) as e:
        _sample(_sample_cfg(main, tmp_path / "x", *auto, f"guide_ckpt={noise}"))
    assert str(e.value) == (
        f"guide {noise} does not fit the model (guide vs model): objective.prediction 'eps' vs 'velocity'; "
        "autoguidance needs a guide of the same data and diffusion (a smaller or less-trained model)"
    )
