"""One default per setting: the YAMLs of the typed groups agree with their dataclasses (config_schema.py), bad
keys and values are refused in one line, and a stored config without a newer key gets its default."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from diffusion_lab.config_schema import RunConfig, schema_of, validate
from diffusion_lab.train import CONF_DIR
from diffusion_lab.training.lit_module import DiffusionModule

# group -> the config key it fills and the override that chooses an option
GROUPS = {
    "objective": ("objective", "objective"),
    "sampler": ("sampler", "sampler"),
    "dataset": ("dataset", "dataset"),
    "metric_suite": ("metrics", "metric_suite@metrics"),
}
# The values a preset is about (it chooses them on purpose); every other value it states must be the default.
PRESET_KEYS = {
    "objective": {"parameterization", "variance", "loss", "time_density"},
    "sampler": {"steps"},  # ddpm_100.yaml
    "dataset": {
        "name",
        "root",
        "split",
        "image_size",
        "channels",
        "num_classes",
        "batch_size",
        "val_fraction",
        "hflip",
        "download",
        "labels",
        "cache_dir",
    },
    "metric_suite": {"classifier_path", "cache_dir"},  # paths of this machine (interpolations)
}


def _options() -> list[tuple[str, str]]:
    return [(g, p.stem) for g in GROUPS for p in sorted((Path(CONF_DIR) / g).glob("*.yaml"))]


def _compose_option(group: str, option: str):
    key, override = GROUPS[group]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"{override}={option}", "paths.cache_dir=/cache"])
    return OmegaConf.to_container(cfg[key], resolve=True)


@pytest.mark.parametrize("group, option", _options(), ids=lambda v: str(v))
def test_every_yaml_default_equals_the_dataclass_default(group, option):
    node = _compose_option(group, option)
    key = GROUPS[group][0]
    schema = schema_of(key, node)
    assert schema is not None, f"conf/{group}/{option}.yaml: no dataclass for {node.get('_target_')}"
    validate(node, key)  # no unknown key, no wrong type
    defaults = OmegaConf.to_container(OmegaConf.structured(schema))
    differ = {
        k: (v, defaults[k]) for k, v in node.items() if v != defaults[k] and k not in PRESET_KEYS[group]
    }
    assert not differ, f"conf/{group}/{option}.yaml disagrees with {schema.__name__}: {differ}"


def test_every_target_of_a_typed_group_has_one_yaml_with_its_defaults():
    """The dataclass of each target is the base YAML of that target: the sampler / objective YAML named for it
    states every default (so ``--help`` and the file show them)."""
    bases = {"objective": ["eps", "flow", "edm"], "sampler": ["ddpm", "ddim", "dpm_solver", "euler", "heun"]}
    bases["sampler"].append("euler_maruyama")
    for group, options in bases.items():
        for option in options:
            node = _compose_option(group, option)
            defaults = OmegaConf.to_container(OmegaConf.structured(schema_of(group, node)))
            assert node == defaults, f"conf/{group}/{option}.yaml vs its dataclass"


def test_run_config_defaults_equal_the_yaml_and_the_module():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config")
    module = inspect.signature(DiffusionModule.__init__).parameters
    for f in dataclasses.fields(RunConfig):
        assert cfg[f.name] == f.default, (
            f"conf/config.yaml {f.name}={cfg[f.name]!r} vs RunConfig {f.default!r}"
        )
        if f.name in module:
            assert module[f.name].default == f.default, f"DiffusionModule {f.name} vs RunConfig"


def test_a_stored_config_without_a_newer_key_gets_its_default():
    old = {"_target_": "diffusion_lab.processes.flow.FlowMatching", "path": "gvp", "prediction": "velocity"}
    filled = validate(old, "objective")
    assert filled.path == "gvp" and filled.coupling == "none" and filled.discrete_steps == 1000


@pytest.mark.parametrize(
    "node, message",
    [
        (
            {"_target_": "diffusion_lab.processes.flow.FlowMatching", "pth": "gvp"},
            "objective.pth is not an option of objective (FlowMatching): valid: path, prediction,",
        ),
        (
            {"_target_": "diffusion_lab.processes.edm.EDMDiffusion", "rho": "seven"},
            "objective.rho='seven' is not valid: expected float",
        ),
    ],
)
def test_bad_keys_and_values_are_one_line(node, message):
    with pytest.raises(ValueError) as e:
        validate(node, "objective")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_dataset_options_of_some_sources_are_typed_but_not_filled():
    """``labels``, ``mirrors``, ... go to the dataset's source, which refuses the ones it does not take."""
    node = {"_target_": "diffusion_lab.data.DiffusionDataModule", "name": "digits"}
    filled = validate(node, "dataset")
    assert filled.batch_size == 128 and "labels" not in filled and "mirrors" not in filled
    with pytest.raises(ValueError, match=r"dataset.box_fraction='big' is not valid: expected float"):
        validate({**node, "box_fraction": "big"}, "dataset")


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.min_snr_gamma=abc", "objective.min_snr_gamma='abc' is not valid: expected float"),
        ("+objective.min_snr_gama=3", "objective.min_snr_gama is not an option of objective"),
        ("sampler.eta=fast", "sampler.eta='fast' is not valid: expected float"),
    ],
)
def test_build_module_refuses_bad_objective_and_sampler_values_in_one_line(override, message):
    from diffusion_lab.training.build import build_module

    GlobalHydra.instance().clear()
    tiny = ["model=mlp", "model.hidden_dim=16", "model.num_layers=2", "sampler=ddim", "trainer.precision=32"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*tiny, "paths.cache_dir=/cache", override])
    with pytest.raises(ValueError) as e:
        build_module(cfg, (1, 8, 8), num_classes=10)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_commands_take_one_sampler_key_without_a_sampler_choice():
    """conf/sampler_options.yaml lists every sampler option (the dataclasses' fields), unset:
    ``sampler.steps=7`` alone composes (no rewriting of the command line) and only the keys given are kept."""
    from diffusion_lab.config_schema import SCHEMAS
    from diffusion_lab.utils.checkpoint_sampler import given_options

    listed = OmegaConf.load(Path(CONF_DIR) / "sampler_options.yaml").sampler
    fields = {f.name for schema in SCHEMAS["sampler"].values() for f in dataclasses.fields(schema)}
    assert set(listed) == fields
    for command in ("sample", "evaluate"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(command, overrides=["ckpt=x.ckpt", "sampler.steps=7"])
            chosen = compose(command, overrides=["ckpt=x.ckpt", "sampler=ddim", "sampler.steps=7"])
        assert OmegaConf.to_container(given_options(cfg.sampler)) == {"steps": 7}
        assert given_options(chosen.sampler).eta == 0.0 and "S_churn" not in given_options(chosen.sampler)
