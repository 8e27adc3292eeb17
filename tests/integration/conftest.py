"""Compose the real Hydra config for integration tests, with the run's folders under tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from diffusion_lab.train import CONF_DIR

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[2]

# The smallest real setup: 8x8 sklearn digits, a tiny MLP, few steps, no media.
MLP = ["model=mlp", "model.hidden_dim=64", "model.num_layers=2"]
FAST_BASE = [
    "dataset=digits",
    "dataset.image_size=8",
    "logger=csv",
    "callbacks=none",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "print_config=false",
    "schedule.timesteps=50",
]
FAST = FAST_BASE + MLP
# 30 steps with checkpoints and EMA: the tiny runs whose checkpoints tests load (``tiny_checkpoint``)
TINY_RUN = [
    "callbacks=default",
    "callbacks.sample_grid=null",
    "callbacks.progress_bar=null",
    "trainer.max_steps=30",
    "trainer.val_check_interval=30",
    "callbacks.model_checkpoint.every_n_train_steps=30",
]


def compose_config(tmp_path: Path, overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.log_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(tmp_path.parent / "cache")
        del cfg["hydra"]
    return cfg


def run_command(
    command: str, args: Sequence[str], cwd: Path, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run ``python train.py ARGS`` (command ``"train.py"``) or ``python -m COMMAND ARGS`` in a subprocess.

    wandb offline and silent, unbuffered output, no ``HYDRA_FULL_ERROR`` (so one-line errors stay one line);
    ``env`` adds or replaces variables. Returns the completed process with text stdout / stderr.
    """
    full_env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    if "HYDRA_FULL_ERROR" not in (env or {}):
        full_env.pop("HYDRA_FULL_ERROR", None)
    target = [str(REPO / command)] if command.endswith(".py") else ["-m", command]
    return subprocess.run(
        [sys.executable, *target, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_commands(
    commands: Sequence[tuple[str, Sequence[str]]], cwd: Path, timeout: int = 300
) -> list[subprocess.CompletedProcess]:
    """Several ``python -m COMMAND ARGS`` (or ``python SCRIPT.py ARGS``) one after another in one subprocess
    (``run_many.py``), each with its own captured stdout / stderr and exit status: one process start instead
    of one per command. A command that fails does not stop the ones after it."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps([[c, list(a)] for c, a in commands]))
        runner = str(Path(__file__).with_name("run_many.py"))
        r = run_command(runner, [str(spec), str(out)], cwd, timeout=timeout)
        if not out.exists():
            raise AssertionError(f"run_many.py failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
        results = json.loads(out.read_text())
    return [
        subprocess.CompletedProcess([c, *a], x["returncode"], x["stdout"], x["stderr"])
        for (c, a), x in zip(commands, results, strict=True)
    ]


@pytest.fixture(name="run_commands")
def run_commands_fixture():
    """:func:`run_commands`: several short commands in one subprocess."""
    return run_commands


@pytest.fixture(name="run_command")
def run_command_fixture():
    """:func:`run_command`: a training script or a ``python -m`` command in a subprocess."""
    return run_command


@pytest.fixture
def make_cfg(tmp_path):
    def make(*overrides: str, fast: bool = True) -> DictConfig:
        """The fast setup (tiny MLP unless a ``model=`` is given) plus ``overrides``."""
        base = (FAST_BASE if any(o.startswith("model=") for o in overrides) else FAST) if fast else []
        return compose_config(tmp_path, base + list(overrides))

    return make


@pytest.fixture(scope="session")
def digits_classifier(tmp_path_factory) -> Path:
    """A digit classifier for 8x8 sklearn digits, trained for one quick epoch (for metric plumbing)."""
    from diffusion_lab.data import DiffusionDataModule
    from diffusion_lab.metrics.classifier import save_classifier
    from diffusion_lab.metrics.train_classifier import train_classifier

    root = tmp_path_factory.mktemp("classifier")
    dm = DiffusionDataModule(name="digits", image_size=8, cache_dir=root / "cache")
    dm.prepare_data()
    x, y = dm.real_images("train")
    xt, yt = dm.real_images("val")
    model, _ = train_classifier(x, y, xt, yt, epochs=1, seed=0, dataset="digits", log=None)
    return save_classifier(model, root / "digits-8px.pt")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a tiny MLP diffusion on 8x8 digits (30 steps, T = 50, EMA on)."""
    from diffusion_lab.train import train

    root = tmp_path_factory.mktemp("tiny_ckpt")
    cfg = compose_config(root, FAST + TINY_RUN)
    result = train(cfg)
    return Path(result["last_checkpoint"])
