"""Optional extras: what the default run does not need is installed with ``pip install 'diffusion_lab[X]'``.

    sweep        hydra-joblib-launcher, hydra-submitit-launcher, hydra-optuna-sweeper
                 (hydra/launcher=local_parallel | slurm, hparams_search=optuna_fid)
    tensorboard  logger=tensorboard
    plot         matplotlib: the multirun summary plot and the experiments' figures
    dev          all of the above, plus pytest and ruff: what ``make test`` needs (``make install``)

A feature whose extra is missing stops with one line naming the extra (:class:`MissingExtraError`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

__all__ = ["MissingExtraError", "require_extra", "check_hydra_plugins", "HYDRA_PLUGIN_CHOICES"]

# Hydra command-line choices that need a plugin from the ``sweep`` extra: (key, value) -> plugin module.
HYDRA_PLUGIN_CHOICES = {
    ("hydra/launcher", "local_parallel"): "hydra_plugins.hydra_joblib_launcher",
    ("hydra/launcher", "joblib"): "hydra_plugins.hydra_joblib_launcher",
    ("hydra/launcher", "slurm"): "hydra_plugins.hydra_submitit_launcher",
    ("hydra/launcher", "submitit_slurm"): "hydra_plugins.hydra_submitit_launcher",
    ("hydra/launcher", "submitit_local"): "hydra_plugins.hydra_submitit_launcher",
    ("hydra/sweeper", "optuna"): "hydra_plugins.hydra_optuna_sweeper",
    ("hparams_search", "optuna_fid"): "hydra_plugins.hydra_optuna_sweeper",
}


class MissingExtraError(ModuleNotFoundError, ValueError):
    """A feature needs an optional extra that is not installed. Also a ValueError (a config choice this
    install cannot honour), so the commands' ``exit_on_bad_input`` prints it as one line."""


def require_extra(module: str, extra: str, feature: str) -> None:
    """Import ``module``, or raise :class:`MissingExtraError`, one line: "<feature> needs the <extra> extra:
    pip install 'diffusion_lab[<extra>]' (<module> is missing)"."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{feature} needs the {extra} extra: pip install 'diffusion_lab[{extra}]' ({module} is missing)",
            name=module,
        ) from e


def check_hydra_plugins(argv: Sequence[str]) -> None:
    """Before Hydra runs: every launcher / sweeper chosen on the command line has its plugin installed.

    (Without it, Hydra's own error is a multi-line "Could not load 'hydra/launcher/joblib'" that names no
    package.)
    """
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        module = HYDRA_PLUGIN_CHOICES.get((key, value)) if sep else None
        if module is not None:
            require_extra(module, "sweep", f"{key}={value}")
