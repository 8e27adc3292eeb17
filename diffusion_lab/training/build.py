"""Build the :class:`~diffusion_lab.training.lit_module.DiffusionModule` of a run config: schedule, objective,
backbone, optimizer, learning-rate schedule and sampler, each instantiated from its config group."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.config_schema import instantiate_checked, run_default
from diffusion_lab.utils.device import compile_options

__all__ = ["build_module", "speed_up"]


def _make(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``instantiate(cfg[key])`` after checking it: against its dataclass (config_schema.py: objective and
    sampler; keys an older stored config lacks get their defaults), else against the target's annotations."""
    return instantiate_checked(cfg[key], key, **kwargs)


def speed_up(
    model: torch.nn.Module, channels_last: bool = False, compile: bool | str = False
) -> torch.nn.Module:
    """The backbone's speed switches: NHWC memory layout (faster convolutions on GPUs; on CPUs eager GroupNorm
    in NHWC is slow) and ``torch.compile`` in place (``Module.compile``: state_dict keys unchanged);
    ``compile`` is false, true or a torch.compile mode such as ``reduce-overhead`` (utils/device.py)."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if (options := compile_options(compile)) is not None:
        model.compile(**options)
    return model


def build_module(
    cfg: DictConfig, image_shape: tuple[int, int, int], num_classes: int, training: bool = False
):
    """Instantiate schedule, objective, backbone, optimizer and sampler from a run config.

    With ``training``, the config's ``channels_last`` and ``compile`` switches apply to the backbone (commands
    that load a checkpoint to sample run it as it is).

    Returns:
        (module, number of backbone parameters).
    """
    from diffusion_lab.models import count_parameters
    from diffusion_lab.training.lit_module import DiffusionModule

    schedule = _make(cfg, "schedule")
    # a partial, so that Hydra does not turn the Schedule dataclass into a config node
    diffusion = _make(cfg, "objective", _partial_=True)(schedule=schedule)
    C, H, _ = image_shape
    model = _make(
        cfg,
        "model",
        in_channels=C,
        out_channels=diffusion.model_out_channels(C),
        image_size=H,
        num_classes=num_classes if run_default(cfg, "class_conditional") else None,
    )
    if training:
        model = speed_up(model, bool(run_default(cfg, "channels_last")), run_default(cfg, "compile"))
    module = DiffusionModule(
        model=model,
        diffusion=diffusion,
        optimizer=_make(cfg, "optimizer"),
        lr_scheduler=_make(cfg, "lr_scheduler") if cfg.get("lr_scheduler") else None,
        sampler=_make(cfg, "sampler") if cfg.get("sampler") else None,
        image_shape=image_shape,
        num_classes=num_classes,
        class_conditional=bool(run_default(cfg, "class_conditional")),
        cond_drop_prob=float(run_default(cfg, "cond_drop_prob")),
        seed=int(run_default(cfg, "seed")),
        val_bpd_ode_images=int(run_default(cfg, "val_bpd_ode_images")),
        val_bpd_ode_steps=int(run_default(cfg, "val_bpd_ode_steps")),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    return module, count_parameters(model)
