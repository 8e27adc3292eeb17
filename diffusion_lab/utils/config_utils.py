"""Config helpers: print the resolved config as a rich tree (and keep a copy in the run directory)."""

from __future__ import annotations

from pathlib import Path

import rich
import rich.syntax
import rich.tree
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

__all__ = ["print_config_tree"]

ORDER = (
    "dataset",
    "model",
    "schedule",
    "objective",
    "sampler",
    "optimizer",
    "lr_scheduler",
    "trainer",
    "callbacks",
    "logger",
    "metrics",
    "paths",
)


@rank_zero_only
def print_config_tree(cfg: DictConfig, save_to: str | Path | None = None) -> None:
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in ORDER if k in cfg] + [k for k in cfg if k not in ORDER]
    for key in keys:
        branch = tree.add(str(key), style="bold", guide_style="dim")
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to is not None:
        path = Path(save_to)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            rich.print(tree, file=f)
