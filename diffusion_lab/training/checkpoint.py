"""Checkpoints: find the last one, read one safely, check that one fits a config, rebuild a module from one.

Every checkpoint is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and plain
containers only, so a file carrying other pickled objects (which could run code) is refused unread.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "find_last_checkpoint",
    "safe_torch_load",
    "read_checkpoint",
    "check_compatible",
    "load_module",
    "UnsafeCheckpointError",
    "COMPAT_KEYS",
]


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled objects other than tensors and plain containers."""


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


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    """The pickled globals that made a weights-only load fail (none: the file is not a pickle at all)."""
    try:  # reads the pickle's opcodes, runs nothing
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint (legacy format): the error message names the global
        names = []
    return names or re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file pickles other objects (named in the message); nothing of it ran.
        ValueError: unreadable or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        names = _unsafe_globals(path, e)
        if names:
            raise UnsafeCheckpointError(
                f"checkpoint {path} refused: it holds pickled objects other than tensors and plain "
                f"containers ({', '.join(names[:3])}), which could run code when loaded; nothing of it was "
                "run; use a checkpoint written by diffusion_lab from a source you trust"
            ) from None
        raise ValueError(
            f"checkpoint {path} is unreadable or truncated (not a file written by torch.save); "
            "use another checkpoint (e.g. the previous step's)"
        ) from None
    except Exception as e:
        raise _unreadable(path, e) from None


def _unreadable(path: Path, e: Exception) -> ValueError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return ValueError(
        f"checkpoint {path} is unreadable or truncated ({type(e).__name__}: {first}); "
        "use another checkpoint (e.g. the previous step's)"
    )


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """A checkpoint written by this project, loaded with :func:`safe_torch_load`."""
    ckpt = safe_torch_load(path, map_location)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or not isinstance(hp.get("config"), dict) or not hp["config"]:
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


def _weights_device(state: dict, path: str | Path) -> torch.device | None:
    """The one device the loaded tensors of ``state`` lie on (None: no tensors); several: a ValueError."""
    devices = {v.device for v in state.values() if isinstance(v, torch.Tensor)}
    if len(devices) > 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise ValueError(
            f"checkpoint {path}: map_location put its weights on several devices ({names}); "
            "give one device, e.g. map_location='cuda'"
        )
    return next(iter(devices), None)


def load_module(path: str | Path, map_location: Any = "cpu", ema: bool = True):
    """Rebuild the :class:`DiffusionModule` of a checkpoint, with its EMA weights (or the raw ones), on the
    device of ``map_location``.

    Args:
        map_location: a device (``"cuda"``, ``torch.device("cpu")``, ``"meta"``): the module comes back
            there. ``torch.load``'s other forms (None: where the weights were saved; a dict or a callable
            remapping storages) load the weights where they say, and the module follows the weights.
        ema: the EMA weights (the checkpoint's ``state_dict``), else the raw ones where stored.

    The checkpoint's run config is checked first: every ``_target_`` in it outside the launch-time parts
    (trainer, callbacks, loggers, which no command builds from a checkpoint) must be one that the configs
    under conf/ name, or one the user admitted (:mod:`diffusion_lab.utils.safe_config`); nothing of it is
    instantiated otherwise.
    """
    from diffusion_lab.training.build import build_module
    from diffusion_lab.utils.safe_config import check_stored_config, upgrade_targets

    ckpt = read_checkpoint(path, map_location)
    hp = ckpt["hyper_parameters"]
    try:
        cfg = OmegaConf.create(
            upgrade_targets(OmegaConf.to_container(OmegaConf.create(hp["config"]), resolve=True))
        )
    except Exception as e:
        raise ValueError(f"checkpoint {path}: its run config does not resolve ({e})") from None
    check_stored_config(cfg, source=f"checkpoint {path}")
    try:
        image_shape, num_classes = tuple(int(v) for v in hp["image_shape"]), int(hp["num_classes"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"checkpoint {path} was not written by diffusion_lab (no image shape inside)"
        ) from None
    module, _ = build_module(cfg, image_shape, num_classes)  # on the CPU
    state = ckpt["state_dict"] if ema or "current_model_state" not in ckpt else ckpt["current_model_state"]
    if isinstance(map_location, (str, torch.device)):
        device = torch.device(map_location)
    else:
        device = _weights_device(state, path)
    if device is not None:
        module.to(device)  # before loading: the weights are copied on their device, not through the CPU
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(
            f"checkpoint {path} does not match its own config: {str(e).splitlines()[0]}"
        ) from None
    module.eval()
    return module, cfg, ckpt
