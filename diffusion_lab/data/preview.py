"""Save a grid of decoded real images, to check a dataset by eye.

    python -m diffusion_lab.data.preview dataset=persian dataset.root=/path/to/hoda out=grid.png

A Hydra command (options in ``conf/preview.yaml``; ``--help`` lists them and the composed config):
``out`` (PNG path, default ``preview_<dataset>.png``), ``split`` (train | val | test, default train),
``per_class`` (images per class row, default 10; 0 gives a plain grid of ``n`` images), ``n`` (default 64),
``scale`` (nearest-neighbour zoom, default 3), and the ``dataset`` group (``dataset=<name>``,
``dataset.<key>=...``; default digits). Rows are classes 0, 1, 2, ... when ``per_class`` > 0.
"""

# ruff: noqa: E402  (a command sets up the process before its imports load torch)

from __future__ import annotations

if __name__ == "__main__":  # run as a command: OpenMP's settings before torch loads (utils/cpu.py)
    from diffusion_lab.utils.cpu import configure_command

    configure_command()

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torchvision.utils import make_grid, save_image

from diffusion_lab.config_schema import instantiate_checked
from diffusion_lab.utils.cli import exit_on_bad_input

__all__ = ["preview_grid", "run", "main"]

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


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


def run(cfg: DictConfig) -> Path:
    """The command on a composed ``conf/preview.yaml``: save the grid, print its labels; return its path."""
    dm = instantiate_checked(cfg.dataset, "dataset")
    dm.prepare_data()
    images, labels = dm.real_images(cfg.split)
    grid, label_rows = preview_grid(images, labels, dm.num_classes, int(cfg.per_class), int(cfg.n))
    scale = int(cfg.scale)
    if scale > 1:
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    out = Path(cfg.out or f"preview_{dm.name}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, out)
    print(f"{dm!r}: {len(images)} {cfg.split} images {tuple(images.shape[1:])}, saved {out}")
    for row in label_rows:
        print("labels:", " ".join(map(str, row)))
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="preview")
def _preview_main(cfg: DictConfig) -> None:
    with exit_on_bad_input():
        run(cfg)


def main() -> None:
    _preview_main()


if __name__ == "__main__":
    main()
