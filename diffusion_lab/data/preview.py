"""Save a grid of decoded real images, to check a dataset by eye.

    python -m diffusion_lab.data.preview dataset=persian dataset.root=/path/to/hoda out=grid.png

Arguments are ``key=value``. Preview options: ``out`` (PNG path, default ``preview_<dataset>.png``),
``split`` (train | val | test, default train), ``per_class`` (images per class row, default 10; 0 gives a
plain grid of ``n`` images), ``n`` (default 64), ``scale`` (nearest-neighbour zoom, default 3). Every other
argument is a Hydra override of the ``dataset`` group (``dataset=<name>``, ``dataset.<key>=...``) composed
from the repository's ``conf/``. Rows are classes 0, 1, 2, ... when ``per_class`` > 0.
"""

# ruff: noqa: E402  (a command sets up the process before its imports load torch)

from __future__ import annotations

if __name__ == "__main__":  # run as a command: OpenMP's settings before torch loads (utils/cpu.py)
    from diffusion_lab.utils.cpu import configure_command

    configure_command()

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchvision.utils import make_grid, save_image

from diffusion_lab.utils.cli import HELP_FLAGS, print_command_help

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
_OPTIONS = {"out": None, "split": "train", "per_class": "10", "n": "64", "scale": "3"}
USAGE = """Save a grid of decoded real images, to check a dataset by eye.

usage: python -m diffusion_lab.data.preview dataset=<name> [dataset.<key>=...] [out=grid.png] [split=train]
       [per_class=10] [n=64] [scale=3]
  out: PNG path (default preview_<dataset>.png); split: train | val | test; per_class: images per class row
  (0: a plain grid of n images); scale: nearest-neighbour zoom."""


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``key=value`` arguments into preview options and Hydra overrides of the dataset group."""
    opts, overrides = dict(_OPTIONS), []
    has_dataset = False
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"preview: expected key=value, got '{arg}'")
        if key in opts:
            opts[key] = value
        elif key == "dataset":
            overrides.append(f"+dataset={value}")
            has_dataset = True
        else:
            overrides.append(arg)
    if not has_dataset:
        overrides.insert(0, "+dataset=digits")
    return opts, overrides


def preview_grid(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, per_class: int, n: int
) -> tuple:
    """(grid float (C, H', W') in [0, 1], label rows) of a class-sorted or plain selection of ``images``."""
    if per_class > 0:
        rows = [torch.nonzero(labels == c).flatten()[:per_class] for c in range(num_classes)]
        rows = [r for r in rows if len(r)]
        pick = torch.cat([torch.cat([r, r.new_full((per_class - len(r),), -1)]) for r in rows])
        valid = pick >= 0
        x = torch.zeros(len(pick), *images.shape[1:], dtype=torch.uint8)
        x[valid] = images[pick[valid]]
        label_rows = [labels[r].tolist() for r in rows]
        nrow = per_class
    else:
        x, nrow = images[:n], 8
        label_rows = [labels[i : i + nrow].tolist() for i in range(0, min(n, len(labels)), nrow)]
    grid = make_grid(x.float() / 255.0, nrow=nrow, padding=2, pad_value=0.5)
    return grid, label_rows


def compose_dataset_config(overrides: list[str]):
    """The ``dataset`` (and ``paths``) groups of ``conf/`` with Hydra ``overrides``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        overrides = (
            ["+paths=default", *overrides] if (CONF_DIR / "paths" / "default.yaml").is_file() else overrides
        )
        return compose(overrides=overrides)


def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in HELP_FLAGS for a in argv):  # usage and the composed config, like the Hydra commands
        _, overrides = parse_args([a for a in argv if a not in HELP_FLAGS])
        yaml = OmegaConf.to_yaml(compose_dataset_config(overrides))
        print_command_help(USAGE, CONF_DIR, ["dataset"], yaml)
        return None
    opts, overrides = parse_args(argv)
    cfg = compose_dataset_config(overrides)
    dm = instantiate(cfg.dataset)
    dm.prepare_data()
    images, labels = dm.real_images(opts["split"])
    grid, label_rows = preview_grid(images, labels, dm.num_classes, int(opts["per_class"]), int(opts["n"]))
    scale = int(opts["scale"])
    if scale > 1:
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    out = Path(opts["out"] or f"preview_{dm.name}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, out)
    print(f"{dm!r}: {len(images)} {opts['split']} images {tuple(images.shape[1:])}, saved {out}")
    for row in label_rows:
        print("labels:", " ".join(map(str, row)))
    return out


if __name__ == "__main__":
    main()
