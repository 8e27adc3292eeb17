"""Draw samples from a checkpoint:

    python -m diffusion_lab.sample ckpt=outputs/train/runs/.../checkpoints/last.ckpt n=64 \
        sampler=ddim sampler.steps=50 seed=0 out=samples/ddim50

writes ``grid.png``, ``samples.npz`` (uint8 (N, C, H, W) ``samples`` and int64 ``labels``) and, with
``animation=true``, ``animation.gif`` of the reverse process.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from diffusion_lab.checkpoint import load_module
from diffusion_lab.cli import exit_on_bad_input
from diffusion_lab.media import save_animation, save_grid, to_uint8
from diffusion_lab.progress import track
from diffusion_lab.samplers import sample as run_sampler

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

__all__ = ["generate", "resolve_device", "main"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def generate(
    module,
    sampler,
    n: int,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    label: int | None = None,
    guidance_scale: float = 1.0,
    frames: list | None = None,
):
    """Draw ``n`` samples in batches (batch i uses seed + i): (uint8 (n, C, H, W), labels (n,), nfe)."""
    device = torch.device(device)
    module = module.to(device).eval()
    outs, labels, nfe = [], [], 0
    conditional = bool(module.hparams.class_conditional)
    batches = range(math.ceil(n / batch_size))  # one batch: the sampler's own step bar shows instead
    for i in track(batches, f"sampling {n} images") if len(batches) > 1 else batches:
        b = min(batch_size, n - i * batch_size)
        if conditional:
            y = (
                torch.full((b,), label, device=device)
                if label is not None
                else torch.arange(i * batch_size, i * batch_size + b, device=device)
                % module.hparams.num_classes
            )
        else:
            y = None
        callback = None
        if frames is not None and i == 0:

            def callback(j, t, x_t, pred_x0):
                frames.append(to_uint8(x_t[:16].cpu(), value_range=(-1, 1)))

        x, k = run_sampler(
            module.model,
            module.diffusion,
            (b, *module.image_shape),
            sampler=sampler,
            seed=seed + i,
            device=device,
            return_nfe=True,
            y=y,
            guidance_scale=guidance_scale,
            callback=callback,
        )
        outs.append(to_uint8(x.cpu(), value_range=(-1, 1)))
        labels.append(y.cpu() if y is not None else torch.full((b,), -1))
        nfe = k
    return torch.cat(outs), torch.cat(labels), nfe


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    with exit_on_bad_input():
        module, run_cfg, ckpt = load_module(cfg.ckpt, ema=cfg.ema)
    sampler = instantiate(cfg.sampler)
    name = cfg.sampler._target_.rsplit(".", 1)[-1].removesuffix("_sample")
    steps = cfg.sampler.get("steps") or module.diffusion.num_timesteps
    out = (
        Path(cfg.out)
        if cfg.out
        else Path(cfg.ckpt).resolve().parents[1] / "samples" / f"{name}-{steps}-seed{cfg.seed}"
    )
    out.mkdir(parents=True, exist_ok=True)
    frames: list | None = [] if cfg.animation else None
    start = time.perf_counter()
    images, labels, nfe = generate(
        module,
        sampler,
        cfg.n,
        cfg.seed,
        cfg.batch_size,
        resolve_device(cfg.device),
        cfg.label,
        cfg.guidance_scale,
        frames,
    )
    seconds = time.perf_counter() - start
    save_grid(images[: min(len(images), 256)], out / "grid.png")
    np.savez_compressed(out / "samples.npz", samples=images.numpy(), labels=labels.numpy())
    if frames:
        idx = torch.linspace(0, len(frames) - 1, min(cfg.animation_frames, len(frames))).round().long()
        save_animation([frames[i] for i in idx.tolist()], out / "animation.gif")
    print(
        f"{cfg.n} samples ({name}, {nfe} network evaluations each, step {ckpt.get('global_step')}) in "
        f"{seconds:.1f} s -> {out}"
    )


if __name__ == "__main__":
    main()
