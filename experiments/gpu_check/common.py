"""What every section shares: the run context, the composed Hydra config, the section record, timing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Ctx", "Record", "compose_run_config", "timed", "sync", "first_line"]


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


@dataclass
class Ctx:
    """Where and how big: ``device`` ("cuda" or "cpu"), ``tiny`` (toy sizes), ``out`` (the results folder),
    ``work`` (run folders, checkpoints and the data cache: outside ``out``, whose files travel back from a
    GPU machine, and unet_cifar's checkpoints are 0.6 GB each)."""

    device: str
    tiny: bool
    out: Path
    work: Path

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def image_size(self) -> int:
        """cifar10_ddpm's 32x32; 16x16 at toy size (every U-Net level still exists)."""
        return 16 if self.tiny else 32

    @property
    def batch(self) -> int:
        """cifar10_ddpm's batch 128 (toy: 4)."""
        return 4 if self.tiny else 128

    @property
    def compile(self) -> bool:
        """torch.compile everywhere trainer=gpu asks for it, except toy runs on the CPU: inductor's C++ build
        of one U-Net takes minutes on a small CPU (the toy run checks the rest of the path in seconds)."""
        return self.cuda or not self.tiny

    def model_overrides(self, model: str) -> list[str]:
        """Toy widths of a model config (the architecture, levels and attention stay as they are)."""
        if not self.tiny:
            return []
        if model.startswith("unet"):
            return ["model.channels=16", "model.num_head_channels=-1", "model.num_heads=2"]
        return []

    def base_overrides(self) -> list[str]:
        """experiment=cifar10_ddpm on the bundled digits as 3x32x32 images (nothing to download), trainer=gpu
        on the chosen device, csv logging, no FID during training."""
        o = [
            "experiment=cifar10_ddpm",
            "dataset=digits",
            f"dataset.image_size={self.image_size}",
            "dataset.channels=3",
            f"dataset.batch_size={self.batch}",
            "logger=csv",
            "print_config=false",
            "trainer.enable_progress_bar=false",
            "metrics.every_n_steps=0",
        ]
        if not self.cuda:
            o += ["trainer.accelerator=cpu"]
        if not self.compile:
            o += ["compile=false"]
        return o


def compose_run_config(ctx: Ctx, overrides: Sequence[str], run_dir: Path):
    """The run config ``train.py`` would see for ``overrides``, its folders under ``run_dir`` (as
    tests/integration/conftest.py composes it: Hydra's ``compose``, then the runtime's output dir)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from diffusion_lab.train import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.log_dir = str(run_dir)
        cfg.paths.output_dir = str(run_dir / "run")
        cfg.paths.cache_dir = str(ctx.work / "cache")
        del cfg["hydra"]
    # Hydra's runtime config is no longer needed (output_dir is set) and must not look initialised:
    # Lightning's DDP launcher would start the other ranks as Hydra jobs (hydra.run.dir=... on the command)
    HydraConfig.instance().cfg = None
    return cfg


class Record(dict):
    """A section's results, saved to ``path`` (JSON) on every :meth:`save`, so that a section killed by its
    time limit still leaves what it measured. ``check(name, ok)`` notes a pass/fail check."""

    def __init__(self, path: Path, **kw: Any):
        super().__init__(status="running", checks={}, **kw)
        self.path = path
        self.save()

    def check(self, name: str, ok: bool, detail: Any = None) -> bool:
        self["checks"][name] = bool(ok)
        if detail is not None:
            self.setdefault("check_details", {})[name] = detail
        self.save()
        return bool(ok)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str) + "\n")
        tmp.replace(self.path)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, n: int) -> float:
    """Seconds per call of ``fn``, ``n`` calls between two device synchronisations."""
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - start) / n
