"""Experiment loggers from the ``logger`` config group; wandb goes offline without credentials and a
wandb failure falls back to CSV instead of stopping training. TensorBoard needs the ``tensorboard`` extra."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion_lab.utils.extras import require_extra

log = logging.getLogger(__name__)

__all__ = ["build_loggers", "close_loggers", "wandb_credentials_present"]


def wandb_credentials_present() -> bool:
    """True when wandb could log online: WANDB_API_KEY, or an api.wandb.ai entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or Path.home() / ".netrc")
        return rc.authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1]) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _wandb(cfg: DictConfig, out_dir: Path, run_cfg: DictConfig, group: str | None, extra_tags: list[str]):
    cfg = cfg.copy()
    with open_dict(cfg):
        offline = cfg.pop("offline", None)
        if offline is None:
            offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not wandb_credentials_present()
        cfg.offline = bool(offline)
        cfg.name = cfg.get("name") or out_dir.name
        cfg.group = cfg.get("group") or group
        cfg.tags = list(cfg.get("tags") or []) + list(extra_tags)
        cfg.save_dir = str(out_dir)
    logger: WandbLogger = instantiate(cfg)
    _ = logger.experiment  # start the run now, so a failure shows here and not mid-training
    logger.log_hyperparams(OmegaConf.to_container(run_cfg, resolve=True))
    if offline:
        log.warning(
            "wandb: no credentials (or WANDB_MODE=offline): logging offline to %s/wandb; "
            "upload later with `wandb sync %s/wandb/offline-run-*`",
            out_dir,
            out_dir,
        )
    return logger


def build_loggers(
    cfg: DictConfig | None,
    out_dir: Path,
    run_cfg: DictConfig,
    group: str | None = None,
    extra_tags: list[str] | None = None,
) -> list[Logger]:
    loggers: list[Logger] = []
    for name, lg_cfg in (cfg or {}).items():
        if lg_cfg is None or "_target_" not in lg_cfg:
            continue
        if "WandbLogger" in lg_cfg._target_:
            try:
                loggers.append(_wandb(lg_cfg, out_dir, run_cfg, group, extra_tags or []))
            except Exception as e:  # wandb must never stop training
                log.warning(
                    "wandb failed to start (%s: %s); continuing with the other loggers", type(e).__name__, e
                )
                if not any("CSVLogger" in str(c.get("_target_", "")) for c in cfg.values() if c):
                    loggers.append(CSVLogger(save_dir=str(out_dir), name="csv", version=""))
            continue
        if lg_cfg._target_.endswith("TensorBoardLogger"):
            require_extra("tensorboard", "tensorboard", f"logger={name}")
        logger = instantiate(lg_cfg)
        if not isinstance(logger, WandbLogger):
            logger.log_hyperparams(OmegaConf.to_container(run_cfg, resolve=True))
        loggers.append(logger)
        log.debug("logger %s ready", name)
    return loggers


def close_loggers(loggers: list[Logger]) -> None:
    """Finish the wandb runs, so that the next run in this process (a multirun job) starts its own."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        run = wandb.run  # the logger's run, if it started one (reading logger.experiment would start one)
        if run is not None:
            try:
                run.finish()
            except Exception as e:  # a failing wandb never fails the run
                log.warning("wandb failed to finish the run (%s); `wandb sync` it later", e)
