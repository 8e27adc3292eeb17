"""Training entry point: ``train(cfg)`` does the work; ``main`` is the Hydra wrapper behind ``train.py``."""

# ruff: noqa: E402  (a command sets up the process before its imports load torch)

from __future__ import annotations

if __name__ == "__main__":  # run as a command: OpenMP's settings before torch loads (utils/cpu.py)
    from diffusion_lab.utils.cpu import configure_command

    configure_command()

import logging
import sys
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion_lab.config_schema import instantiate_checked
from diffusion_lab.training.build import build_module
from diffusion_lab.training.callbacks import EMA, FinalLastCheckpoint, SampleQuality
from diffusion_lab.training.checkpoint import check_compatible, find_last_checkpoint, read_checkpoint
from diffusion_lab.training.checkpoint_io import AtomicCheckpointIO
from diffusion_lab.training.device_check import check_trainer_device
from diffusion_lab.training.guards import NonFiniteGuard
from diffusion_lab.training.loggers import build_loggers, close_loggers
from diffusion_lab.training.preemption import (
    PREEMPTED_EXIT_CODE,
    Preempted,
    PreemptionCheckpoint,
    lost_peer,
    requeued_checkpoint,
)
from diffusion_lab.training.run_lock import lock_run_dir, release_run_dir, run_dir_in_use
from diffusion_lab.utils.cli import CommandError, exit_on_bad_input
from diffusion_lab.utils.config_utils import print_config_tree
from diffusion_lab.utils.cpu import default_threads, register_resolvers
from diffusion_lab.utils.device import configure_gpu
from diffusion_lab.utils.fileio import remove_stale_temp_files
from diffusion_lab.utils.safe_config import check_arguments, upgrade_targets

log = logging.getLogger("diffusion_lab")

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

__all__ = ["train", "main", "CONF_DIR"]


def _sweep_info(cfg: DictConfig) -> tuple[str | None, list[str]]:
    """For a multirun job: (wandb group = the sweep's folder name, tags = this job's swept values)."""
    try:
        hc = HydraConfig.get()
    except ValueError:
        return None, []
    if hc.mode != RunMode.MULTIRUN:
        return None, []
    swept: set[str] = set()
    sweep_file = Path(hc.sweep.dir) / "multirun.yaml"
    if sweep_file.is_file():  # the sweep's own command-line overrides, written before the jobs start
        from hydra.core.override_parser.overrides_parser import OverridesParser

        task = OmegaConf.load(sweep_file).hydra.overrides.task
        parsed = OverridesParser.create().parse_overrides([str(o) for o in task])
        swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    tags = [o for o in hc.overrides.task if o.split("=", 1)[0] in swept]
    return Path(hc.sweep.dir).name, tags


def _trainer_choice() -> str | None:
    """The ``trainer=`` option of a Hydra run (``gpu``), or None outside one."""
    try:
        return HydraConfig.get().runtime.choices.get("trainer")
    except ValueError:
        return None


def _callbacks(cfg: DictConfig) -> list[pl.Callback]:
    callbacks, ema = [], []
    for name, cb_cfg in (cfg.get("callbacks") or {}).items():
        if cb_cfg is None or "_target_" not in cb_cfg:
            continue
        cb = instantiate(cb_cfg)
        if isinstance(cb, ProgressBar) and not cfg.trainer.get("enable_progress_bar", True):
            continue  # trainer.enable_progress_bar=false turns every bar off (Lightning refuses both)
        (ema if isinstance(cb, EMA) else callbacks).append(cb)
        log.debug("callback %s: %s", name, type(cb).__name__)
    if any(isinstance(cb, ModelCheckpoint) for cb in callbacks):
        callbacks.append(FinalLastCheckpoint())
    # first: a non-finite loss or gradient stops (or skips) the step before anything else sees it
    guard = NonFiniteGuard(cfg.nan_policy, cfg.nan_skip_limit)
    return [guard] + callbacks + ema  # the EMA last: it swaps weights around validation


def _quality_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """Training-time sample quality (FID etc.) and the best checkpoint by it, when configured and possible."""
    m = cfg.get("metrics")
    if not m or not m.get("every_n_steps") or not m.get("names"):
        return []
    needs_classifier = any(not n.endswith("_inception") for n in m.names)
    if needs_classifier and not Path(m.classifier_path).is_file():
        log.warning(
            "metrics: no digit classifier at %s, so no FID during training; train one with "
            "`python -m diffusion_lab.metrics.train_classifier dataset=%s` (or set metrics.names)",
            m.classifier_path,
            cfg.dataset.name,
        )
        return []
    quality = SampleQuality(
        m,
        every_n_steps=m.every_n_steps,
        n=m.n,
        sampler=instantiate_checked(m.sampler, "sampler") if m.sampler else None,  # None: the run's sampler
        real_split=m.real_split,
        n_real=m.n_real,
    )
    callbacks: list[pl.Callback] = [quality]
    first = (
        "fid_classifier"
        if "fid_classifier" in m.names
        else next((n for n in m.names if n.startswith("fid_")), None)
    )
    if first and cfg.get("callbacks"):
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(Path(cfg.paths.output_dir) / "checkpoints"),
                filename=f"best-{first}-step{{step:07d}}",
                auto_insert_metric_name=False,
                monitor=f"val/{first}",
                mode="min",
                save_top_k=1,
                every_n_train_steps=m.every_n_steps,
                save_on_train_epoch_end=False,
            )
        )
    return callbacks


def _remove_partial_checkpoints(folder: Path) -> None:
    """Delete temporary files of checkpoint writes interrupted by a kill (only where no live run writes)."""
    if folder.is_dir() and not run_dir_in_use(folder.parent):
        for p in remove_stale_temp_files(folder):
            log.info("removed %s, a partial checkpoint left by an interrupted write", p)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train a diffusion model as ``cfg`` says; returns the final logged metrics and the run's paths.

    The run directory is locked for the run (:mod:`diffusion_lab.training.run_lock`):
    a second run there is refused. ``train.py`` and :func:`diffusion_lab.api.train` both run it.
    """
    register_resolvers()  # ${cpu_precision:} of a config composed by the caller (idempotent)
    from diffusion_lab.utils.quiet import quiet_third_party_notices

    quiet_third_party_notices()  # Lightning's litlogger tip and LeafSpec warning are not the run's business
    check_trainer_device(cfg.trainer, _trainer_choice())  # before anything is written
    out_dir = Path(cfg.paths.output_dir)
    took_lock = lock_run_dir(out_dir)
    try:
        return _train(cfg, out_dir)
    finally:
        if took_lock:
            release_run_dir(out_dir)


def _train(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    if cfg.print_config:
        print_config_tree(cfg, save_to=Path(cfg.paths.output_dir) / "config_tree.log")
    threads = int(cfg.threads) if cfg.get("threads") else default_threads()
    torch.set_num_threads(threads)
    log.info("torch CPU threads: %d%s", threads, "" if cfg.get("threads") else " (the cores idle at start)")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_partial_checkpoints(out_dir / "checkpoints")

    # the trainer first: its values feed others by interpolation (lr_scheduler.total_steps: trainer.max_steps)
    check_arguments(cfg.trainer, "trainer")
    datamodule: pl.LightningDataModule = instantiate_checked(cfg.dataset, "dataset")  # config_schema.py
    image_shape = (datamodule.channels, datamodule.image_size, datamodule.image_size)

    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path and (requeued := requeued_checkpoint(out_dir)) is not None:
        ckpt_path = str(requeued)
        log.info("requeued job: resuming from %s", ckpt_path)
    if ckpt_path == "last":
        ckpt_path = str(find_last_checkpoint(cfg.paths.log_dir, cfg.task_name))
    if ckpt_path:
        ckpt = read_checkpoint(ckpt_path)
        check_compatible(upgrade_targets(ckpt["hyper_parameters"]["config"]), cfg, ckpt_path)
        log.info("resuming from %s (step %s)", ckpt_path, ckpt.get("global_step"))
        del ckpt
        _remove_partial_checkpoints(Path(ckpt_path).resolve().parent)

    module, n_params = build_module(cfg, image_shape, datamodule.num_classes, training=True)
    log.info("backbone %s: %s parameters", type(module.model).__name__, f"{n_params:,}")

    group, sweep_tags = _sweep_info(cfg)
    loggers = build_loggers(cfg.get("logger"), out_dir, cfg, group=group, extra_tags=sweep_tags)
    for lg in loggers:
        lg.log_hyperparams({"num_parameters": n_params})

    preemption = PreemptionCheckpoint()  # SIGTERM / SIGUSR1: a resumable last.ckpt, then a clean stop
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=_callbacks(cfg) + _quality_callbacks(cfg) + [preemption],
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
    )
    configure_gpu(trainer.strategy.root_device)  # TF32 matmuls on a GPU (utils/device.py)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except Exception as e:
        if trainer.world_size > 1 and lost_peer(e):
            raise CommandError(
                f"rank {trainer.global_rank}: another process of this run died or stopped answering "
                f"({str(e).strip().splitlines()[0][:160]}); the run stopped at step {trainer.global_step}, "
                "resume with ckpt_path=last"
            ) from None
        raise
    except SIGTERMException:
        raise Preempted(
            f"stopped by a termination signal at step {preemption.step}: saved {preemption.saved}; "
            "resume with ckpt_path=last"
        ) from None
    finally:
        close_loggers(loggers)  # one wandb run per run, also for the jobs of a multirun in one process
    wall = time.perf_counter() - start
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    ckpts = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    last = next((cb.last_model_path for cb in ckpts if cb.last_model_path), None)
    best = next((cb.best_model_path for cb in ckpts if cb.monitor and cb.best_model_path), None)
    result = {
        "metrics": metrics,
        "output_dir": str(out_dir),
        "last_checkpoint": last,
        "best_checkpoint": best,
        "num_parameters": n_params,
        "global_step": trainer.global_step,
        "wall_seconds": round(wall, 1),
    }
    if trainer.is_global_zero:
        OmegaConf.save(OmegaConf.create(result), out_dir / "result.yaml")
        log.info("run directory: %s", out_dir)
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    with open_dict(cfg):
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    try:
        with exit_on_bad_input():
            result = train(cfg)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    # A metric for Hydra sweepers (Optuna minimises it).
    metrics = result["metrics"]
    objective = cfg.get("optimized_metric")
    return metrics.get(objective) if objective else None


class _TrainModule(types.ModuleType):
    """This module, callable: ``diffusion_lab.train(overrides)`` is :func:`diffusion_lab.api.train` (the
    package attribute of a submodule is the submodule, so the API function and this module share a name)."""

    def __call__(
        self,
        overrides: Sequence[str] = (),
        *,
        run_dir: str | Path | None = None,
        configure_threads: bool = False,
    ) -> Path:
        from diffusion_lab.api import train as train_api

        return train_api(overrides, run_dir=run_dir, configure_threads=configure_threads)


if __name__ == "__main__":
    main()
else:
    sys.modules[__name__].__class__ = _TrainModule
