"""Typed configs of the ``objective``, ``sampler``, ``dataset`` and ``metrics`` groups and the run's top-level
switches: one dataclass per ``_target_``, whose field defaults are the one default of each setting.

A group's YAML (``conf/<group>/<name>.yaml``) names a ``_target_`` and the values it chooses;
:func:`validate` merges it onto the target's dataclass (``OmegaConf.merge(OmegaConf.structured(Schema),
node)``) before anything is built, so

- a key the target does not take, or a value of the wrong type, is refused in one line naming the key and the
  valid ones (``objective.min_snr_gama is not an option of objective (GaussianDiffusion): valid: ...``);
- a stored config written before a key existed gets the dataclass default of that key (old checkpoints keep
  loading).

Validation happens at build time (not through Hydra's ConfigStore defaults), so ``objective=flow
objective.path=gvp``, multirun sweeps and stored configs work as before. ``tests/unit/test_config_schema.py``
checks that every YAML of these groups agrees with the dataclass defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

__all__ = [
    "GaussianDiffusionConfig",
    "FlowMatchingConfig",
    "EDMConfig",
    "SamplerConfig",
    "DDPMSamplerConfig",
    "DDIMSamplerConfig",
    "DPMSolverSamplerConfig",
    "EulerSamplerConfig",
    "HeunSamplerConfig",
    "EulerMaruyamaSamplerConfig",
    "DatasetConfig",
    "MetricsConfig",
    "RunConfig",
    "SCHEMAS",
    "schema_of",
    "validate",
    "instantiate_checked",
    "run_default",
]

# ------------------------------------------------------------------------------------------ objective


@dataclass
class GaussianDiffusionConfig:
    """``processes.diffusion.GaussianDiffusion`` (conf/objective/eps.yaml; presets v, x0, vlb, hybrid)."""

    _target_: str = "diffusion_lab.processes.diffusion.GaussianDiffusion"
    parameterization: str = "eps"
    variance: str = "fixed_small"
    loss: str = "simple"
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    hybrid_lambda: float = 0.001


@dataclass
class FlowMatchingConfig:
    """``processes.flow.FlowMatching`` (conf/objective/flow.yaml, interpolant.yaml)."""

    _target_: str = "diffusion_lab.processes.flow.FlowMatching"
    path: str = "linear"
    prediction: str = "velocity"
    time_density: str = "logit_normal"
    loc: float = 0.0
    scale: float = 1.0
    mode_scale: float = 1.29
    P_mean: float = -1.2
    P_std: float = 1.2
    shift: float = 1.0
    loss_weighting: str = "default"
    min_snr_gamma: float = 5.0
    t_eps: float | None = None
    sample_eps: float | None = None
    time_scale: float = 1000.0
    coupling: str = "none"
    discrete_steps: int = 1000


@dataclass
class EDMConfig:
    """``processes.edm.EDMDiffusion`` (conf/objective/edm.yaml)."""

    _target_: str = "diffusion_lab.processes.edm.EDMDiffusion"
    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    discrete_steps: int = 1000


# ------------------------------------------------------------------------------------------ sampler


@dataclass
class SamplerConfig:
    """The options every sampler takes (``samplers/``: one signature); ``steps`` is an int, ``null`` (all T
    steps) or a respacing string."""

    _target_: str = ""
    _partial_: bool = True
    steps: Any = None
    grid: str = "uniform"
    grid_opts: dict[str, Any] = field(default_factory=dict)
    clip_denoised: bool = True
    dynamic_threshold: float | None = None
    guidance_scale: float = 1.0


@dataclass
class DDPMSamplerConfig(SamplerConfig):
    _target_: str = "diffusion_lab.samplers.ddpm_sample"


@dataclass
class DDIMSamplerConfig(SamplerConfig):
    _target_: str = "diffusion_lab.samplers.ddim_sample"
    steps: Any = 50
    eta: float = 0.0


@dataclass
class DPMSolverSamplerConfig(SamplerConfig):
    _target_: str = "diffusion_lab.samplers.dpm_solver_sample"
    steps: Any = 20
    grid: str = "logsnr_uniform"
    order: int = 2


@dataclass
class EulerSamplerConfig(SamplerConfig):
    _target_: str = "diffusion_lab.samplers.euler_sample"
    steps: Any = 35
    grid: str = "karras"
    S_churn: float = 0.0
    S_tmin: float = 0.0
    S_tmax: float | None = None
    S_noise: float = 1.0


@dataclass
class HeunSamplerConfig(EulerSamplerConfig):
    _target_: str = "diffusion_lab.samplers.heun_sample"
    steps: Any = 18


@dataclass
class EulerMaruyamaSamplerConfig(SamplerConfig):
    _target_: str = "diffusion_lab.samplers.euler_maruyama_sample"
    steps: Any = 100
    grid: str = "time_uniform"
    diffusion_form: str = "sigma"
    diffusion_norm: float = 1.0
    t_start: float | None = None
    t_end: float = 0.001


# ------------------------------------------------------------------------------------------ dataset


@dataclass
class DatasetConfig:
    """``data.DiffusionDataModule``: the settings every dataset shares, then the ones of some datasets only
    (``labels``: folder; ``mirrors``: the downloaded ones; ``box_fraction``, ``test_fraction``,
    ``split_seed``: Hoda). Per-dataset values (name, root, size, classes, batch size) are the presets'."""

    _target_: str = "diffusion_lab.data.DiffusionDataModule"
    name: str = "digits"
    root: str | None = None
    split: str | None = None
    image_size: int | None = None
    channels: int | None = None
    num_classes: int | None = None
    batch_size: int = 128
    num_workers: int = 0
    val_fraction: float = 0.05
    seed: int = 0
    hflip: bool | None = None
    balance_classes: bool = False
    cache_dir: str | None = None
    download: bool = False
    labels: str | None = None
    mirrors: list[str] | None = None
    box_fraction: float = 0.8
    test_fraction: float = 0.2
    split_seed: int = 0


# ------------------------------------------------------------------------------------------ metrics


@dataclass
class MetricsConfig:
    """``metrics.`` of the training config (conf/metric_suite/default.yaml; ``MetricSuite.from_config``)."""

    names: list[str] = field(
        default_factory=lambda: ["fid_classifier", "kid_classifier", "is_classifier", "class_histogram"]
    )
    n: int = 1000
    n_real: int | None = None
    real_split: str = "test"
    every_n_steps: int = 5000
    sampler: Any | None = None
    batch_size: int = 100
    kid_subsets: int = 50
    kid_subset_size: int = 1000
    is_splits: int = 10
    seed: int = 0
    classifier_path: str | None = None
    inception_weights: str | None = None
    inception_antialias: bool = True
    cache_dir: str | None = None
    classifier_epochs: int = 5
    classifier_seed: int = 0
    classifier_threads: int | None = None
    classifier_train_split: str = "train"
    classifier_test_split: str = "test"


# ------------------------------------------------------------------------------------------ top level


@dataclass
class RunConfig:
    """The run's top-level switches that ``build_module`` reads (conf/config.yaml). Stored configs of older
    runs may lack the newer ones: :func:`run_default` gives their default."""

    class_conditional: bool = False
    cond_drop_prob: float = 0.1
    seed: int = 0
    val_bpd_ode_images: int = 8
    val_bpd_ode_steps: int = 8
    channels_last: bool = False
    compile: Any = False


_OBJECTIVES = (GaussianDiffusionConfig, FlowMatchingConfig, EDMConfig)
_SAMPLERS = (
    DDPMSamplerConfig,
    DDIMSamplerConfig,
    DPMSolverSamplerConfig,
    EulerSamplerConfig,
    HeunSamplerConfig,
    EulerMaruyamaSamplerConfig,
)
# Options that only some targets' sources take (DiffusionDataModule hands them to the dataset's source, which
# refuses the others): typed when given, never filled in.
_ONLY_WHEN_GIVEN = {DatasetConfig: ("labels", "mirrors", "box_fraction", "test_fraction", "split_seed")}
SCHEMAS: dict[str, dict[str | None, type]] = {
    "objective": {c._target_: c for c in _OBJECTIVES},
    "sampler": {c._target_: c for c in _SAMPLERS},
    "dataset": {DatasetConfig._target_: DatasetConfig},
    "metrics": {None: MetricsConfig},
}


def schema_of(group: str, node: Any) -> type | None:
    """The dataclass of ``node`` (a config of ``group``), by its ``_target_``; None for a target this module
    does not type (an admitted third-party class: its annotations are checked instead)."""
    schemas = SCHEMAS.get(group)
    if schemas is None:
        return None
    target = node.get("_target_") if hasattr(node, "get") else None
    return schemas.get(target)


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def validate(node: DictConfig | dict, group: str) -> DictConfig:
    """``node`` merged onto its dataclass: unknown keys and wrong types refused in one line (ValueError), the
    keys it lacks filled with their defaults. A node whose target has no dataclass comes back as it is."""
    schema = schema_of(group, node)
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    if schema is None:
        return OmegaConf.create(plain)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    where = f"{group} ({schema.__name__.removesuffix('Config')})"
    unknown = [k for k in plain if k not in fields]
    if unknown:
        valid = ", ".join(k for k in fields if not k.startswith("_"))
        raise ValueError(f"{group}.{unknown[0]} is not an option of {where}: valid: {valid}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), plain)
    except (ValidationError, ConfigKeyError) as e:
        key = str(getattr(e, "key", None) or getattr(e, "full_key", "") or "?").rsplit(".", 1)[-1]
        value = plain.get(key, "?")
        wanted = _describe(schema.__annotations__.get(key, "?"))
        raise ValueError(f"{group}.{key}={value!r} is not valid: expected {wanted}") from None
    filled = OmegaConf.to_container(merged)  # untyped again: instantiate adds its kwargs
    for key in _ONLY_WHEN_GIVEN.get(schema, ()):  # options of some sources only: checked, not filled
        if key not in plain:
            del filled[key]
    return OmegaConf.create(filled)


def instantiate_checked(node: DictConfig | dict, group: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` of ``node`` after :func:`validate` (for a target without a dataclass:
    after the check of its values against the target's annotations)."""
    from hydra.utils import instantiate

    if schema_of(group, node) is None:
        from diffusion_lab.utils.safe_config import check_arguments

        check_arguments(node if isinstance(node, DictConfig) else OmegaConf.create(node), group)
        return instantiate(node, **kwargs)
    return instantiate(validate(node, group), **kwargs)


def run_default(cfg: DictConfig | dict, key: str) -> Any:
    """``cfg[key]``, or the :class:`RunConfig` default where a stored config (an older run's) lacks it."""
    value = cfg.get(key, dataclasses.MISSING)
    if value is dataclasses.MISSING:
        return next(f for f in dataclasses.fields(RunConfig) if f.name == key).default
    return value
