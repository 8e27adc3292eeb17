"""Checkpoints: find the last one, check that one fits a config, rebuild a module from one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "find_last_checkpoint",
    "read_checkpoint",
    "check_compatible",
    "build_module",
    "load_module",
    "COMPAT_KEYS",
]

# Config entries that decide the shapes and meaning of the weights.
COMPAT_KEYS = (
    "model",
    "objective",
    "schedule.timesteps",
    "dataset.channels",
    "dataset.image_size",
    "class_conditional",
)


def find_last_checkpoint(log_dir: str | Path, task_name: str) -> Path:
    """The newest ``last.ckpt`` among this task's runs (and multirun jobs)."""
    root = Path(log_dir) / task_name
    found = sorted(root.glob("runs/*/checkpoints/last.ckpt")) + sorted(
        root.glob("multiruns/*/*/checkpoints/last.ckpt")
    )
    if not found:
        raise FileNotFoundError(
            f"ckpt_path=last: no last.ckpt under {root}; give the path instead (ckpt_path=/path/to/last.ckpt)"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ValueError(
            f"checkpoint {path} is unreadable or truncated ({type(e).__name__}: {e}); "
            "use another checkpoint (e.g. the previous step's)"
        ) from None
    if "hyper_parameters" not in ckpt or not ckpt["hyper_parameters"].get("config"):
        raise ValueError(f"checkpoint {path} was not written by diffusion_lab (no run config inside)")
    return ckpt


def _select(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def check_compatible(ckpt_config: dict, cfg: DictConfig | dict, path: str | Path = "checkpoint") -> None:
    """Raise ValueError naming every setting where ``cfg`` differs from the checkpoint's own config."""
    new = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    diffs = []
    for key in COMPAT_KEYS:
        a, b = _flat(_select(ckpt_config, key), key), _flat(_select(new, key), key)
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                diffs.append(f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}")
    if diffs:
        raise ValueError(
            f"checkpoint {path} does not fit this config: "
            + "; ".join(diffs)
            + " (use the checkpoint's settings or start a new run)"
        )


def build_module(cfg: DictConfig, image_shape: tuple[int, int, int], num_classes: int):
    """Instantiate schedule, objective, backbone, optimizer and sampler from a run config."""
    from hydra.utils import instantiate

    from diffusion_lab.lit_module import DiffusionModule
    from diffusion_lab.models import count_parameters

    schedule = instantiate(cfg.schedule)
    # a partial, so that Hydra does not turn the Schedule dataclass into a config node
    diffusion = instantiate(cfg.objective, _partial_=True)(schedule=schedule)
    C, H, _ = image_shape
    model = instantiate(
        cfg.model,
        in_channels=C,
        out_channels=diffusion.model_out_channels(C),
        image_size=H,
        num_classes=num_classes if cfg.get("class_conditional", False) else None,
    )
    module = DiffusionModule(
        model=model,
        diffusion=diffusion,
        optimizer=instantiate(cfg.optimizer),
        lr_scheduler=instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        sampler=instantiate(cfg.sampler) if cfg.get("sampler") else None,
        image_shape=image_shape,
        num_classes=num_classes,
        class_conditional=bool(cfg.get("class_conditional", False)),
        cond_drop_prob=float(cfg.get("cond_drop_prob", 0.0)),
        seed=int(cfg.get("seed", 0)),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    return module, count_parameters(model)


def load_module(path: str | Path, map_location: Any = "cpu", ema: bool = True):
    """Rebuild the :class:`DiffusionModule` of a checkpoint, with its EMA weights (or the raw ones)."""
    ckpt = read_checkpoint(path, map_location)
    hp = ckpt["hyper_parameters"]
    cfg = OmegaConf.create(hp["config"])
    module, _ = build_module(cfg, tuple(hp["image_shape"]), int(hp["num_classes"]))
    state = ckpt["state_dict"] if ema or "current_model_state" not in ckpt else ckpt["current_model_state"]
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(
            f"checkpoint {path} does not match its own config: {str(e).splitlines()[0]}"
        ) from None
    module.eval()
    return module, cfg, ckpt
