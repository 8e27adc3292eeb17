"""Draw samples from a checkpoint:

    python -m diffusion_lab.sample ckpt=outputs/train/runs/.../checkpoints/last.ckpt n=64 seed=0
    python -m diffusion_lab.sample ckpt=... sampler.steps=50          # the checkpoint's sampler, 50 steps
    python -m diffusion_lab.sample ckpt=... sampler=ddim sampler.steps=50 out=samples/ddim50

draws with the checkpoint's own sampler config (its run's ``sampler``) unless ``sampler=NAME`` chooses one
(:mod:`diffusion_lab.utils.checkpoint_sampler`); the first line says which. It

writes ``grid.png``, ``samples.npz`` (uint8 (N, C, H, W) ``samples`` and int64 ``labels``) and, with
``animation=true``, ``animation.gif`` of the reverse process.
"""

# ruff: noqa: E402  (a command sets up the process before its imports load torch)

from __future__ import annotations

if __name__ == "__main__":  # run as a command: OpenMP's settings before torch loads (utils/cpu.py)
    from diffusion_lab.utils.cpu import configure_command

    configure_command()

import logging
import math
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion_lab.api import check_sampler_config, draw, load, resolve_device
from diffusion_lab.config_schema import instantiate_checked
from diffusion_lab.samplers.guidance import AutoGuidance, check_guide
from diffusion_lab.utils.checkpoint_sampler import SamplerChoice, choose_sampler, sampler_name
from diffusion_lab.utils.cli import exit_on_bad_input
from diffusion_lab.utils.media import save_animation, save_grid, to_uint8

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

__all__ = [
    "generate",
    "default_out",
    "resolve_device",
    "require_checkpoint",
    "check_count",
    "check_sampler",
    "load_guide",
    "use_checkpoint_sampler",
    "main",
]


def generate(
    module,
    sampler,
    n: int,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    label: int | None = None,
    frames: list | None = None,
    guide=None,
    guide_weight: float = 1.0,
):
    """Draw ``n`` samples in batches (batch i uses seed + i): (uint8 (n, C, H, W), labels (n,), nfe).

    :func:`diffusion_lab.api.draw` (the loop behind ``Pipeline.sample`` too) on ``device``, with uint8
    images and label -1 for an unconditional model. ``sampler`` carries every sampling option,
    classifier-free guidance (``guidance_scale``) included: the ``sampler`` config is the one place they are
    set. ``guide`` (a module, see :func:`load_guide`) adds autoguidance with weight ``guide_weight``
    (:class:`~diffusion_lab.samplers.guidance.AutoGuidance`; each network evaluation then runs both networks
    and counts once).
    """
    device = torch.device(device)
    module = module.to(device).eval()
    model_fn = module.model
    if guide is not None:
        model_fn = AutoGuidance(module.model, guide.to(device).eval().model, guide_weight)
    images, labels, nfe = draw(
        module,
        sampler,
        n,
        seed=seed,
        batch_size=batch_size,
        labels=label,
        model_fn=model_fn,
        device=device,
        frames=frames,
    )
    labels = labels if labels is not None else torch.full((n,), -1, dtype=torch.long)
    return to_uint8(images, value_range=(-1, 1)), labels, nfe


def default_out(ckpt_path: str, name: str) -> Path:
    """Where samples go without ``out=``: ``samples/<name>`` beside a checkpoint's run, and
    ``samples/<folder>/<name>`` under the current directory for an exported folder (which stays as it was
    exported)."""
    path = Path(ckpt_path).resolve()
    if path.is_dir() and not (path / "checkpoints").is_dir():
        return Path("samples") / path.name / name
    run = path if path.is_dir() else path.parents[1]
    return run / "samples" / name


def grid_layout(n: int, num_classes: int | None, most: int = 256) -> tuple[int, int | None]:
    """(images shown, images per row) of the sample grid: with ``num_classes`` (labels cycling through the
    classes) one column per class, so column k holds class k, in as many whole rows as fit in ``most``."""
    if not num_classes:
        return min(n, most), None
    k = int(num_classes)
    rows = max(1, min(n, max(most, k)) // k)
    return min(n, rows * k), k


def require_checkpoint(cfg: DictConfig) -> str:
    """``cfg.ckpt``, or a one-line ValueError when it was not given."""
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt:
        raise ValueError(
            "no checkpoint given: add ckpt=PATH, e.g. ckpt=outputs/train/runs/<run>/checkpoints/last.ckpt"
        )
    return str(cfg.ckpt)


def check_count(cfg: DictConfig, key: str) -> int:
    """``cfg[key]`` as a whole number >= 1, or a one-line ValueError naming the key."""
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key}={value!r} is not valid: give a whole number >= 1")
    return value


def check_sampler(cfg: DictConfig, module) -> None:
    """Refuse, before anything is written, sampler steps outside [1, T] and labels the model lacks."""
    if "guidance_scale" in cfg:  # e.g. +guidance_scale=3: it would be silently ignored
        raise ValueError(
            f"guidance_scale is a sampler option: write sampler.guidance_scale={cfg.guidance_scale}"
        )
    check_sampler_config(cfg.sampler, module.diffusion)
    label = cfg.get("label")  # sample.yaml has it; evaluate.yaml (no labels) does not
    if label is not None:
        k = int(module.hparams.num_classes)
        if not module.hparams.class_conditional:
            raise ValueError(f"label={label!r}: this checkpoint's model is unconditional; leave label=null")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < k:
            raise ValueError(f"label={label!r} is not valid: give a class in [0, {k - 1}] or null")


def load_guide(cfg: DictConfig, module, run_cfg: DictConfig):
    """The guiding module of ``guidance=auto guide_ckpt=PATH`` (None without guidance), checked against the
    model (same data, image shape, classes, diffusion and parameterization); one-line ValueErrors."""
    mode = cfg.guidance
    if mode in (None, "none", False):
        if cfg.guide_ckpt:
            raise ValueError(f"guide_ckpt={cfg.guide_ckpt} is set but guidance is not: add guidance=auto")
        return None
    if mode != "auto":
        raise ValueError(
            f"guidance={mode!r} is not valid: use guidance=auto (autoguidance) or null; classifier-free "
            "guidance is sampler.guidance_scale"
        )
    if not cfg.guide_ckpt:
        raise ValueError(
            "guidance=auto needs the guiding model: add guide_ckpt=PATH (a smaller or less-trained run)"
        )
    weight = cfg.guide_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"guide_weight={weight!r} is not valid: give a number, e.g. 2.0 (1 = no guidance)")
    guide_pipe = load(cfg.guide_ckpt, device="cpu", ema=cfg.guide_ema)
    guide, guide_cfg = guide_pipe.module, guide_pipe.config
    check_guide(
        OmegaConf.to_container(run_cfg, resolve=True),
        tuple(module.image_shape),
        int(module.hparams.num_classes),
        OmegaConf.to_container(guide_cfg, resolve=True),
        tuple(guide.image_shape),
        int(guide.hparams.num_classes),
        guide_path=str(cfg.guide_ckpt),
    )
    return guide


def use_checkpoint_sampler(cfg: DictConfig, run_cfg: DictConfig, ckpt_path: str) -> SamplerChoice:
    """Put the sampler to draw with into ``cfg.sampler`` (the checkpoint's, a ``sampler=`` choice, or the
    checkpoint's with some keys overridden; ``cfg.sampler_fallback`` for checkpoints that store none) and
    print which one it is."""
    choice = choose_sampler(
        cfg.get("sampler"),
        run_cfg.get("sampler"),
        str(cfg.sampler_fallback),
        source=f"checkpoint {ckpt_path}",
    )
    with open_dict(cfg):
        cfg.sampler = choice.config
    print(choice.line, flush=True)
    return choice


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def _sample_main(cfg: DictConfig) -> None:
    with exit_on_bad_input():
        _sample(cfg)


def main() -> None:
    _sample_main()


def _sample(cfg: DictConfig) -> None:
    ckpt_path = require_checkpoint(cfg)
    n, batch_size = check_count(cfg, "n"), check_count(cfg, "batch_size")
    device = resolve_device(cfg.device)
    pipe = load(ckpt_path, device=device, ema=cfg.ema)  # a checkpoint, a run directory or an exported folder
    module, run_cfg = pipe.module, pipe.config
    use_checkpoint_sampler(cfg, run_cfg, ckpt_path)
    check_sampler(cfg, module)
    guide = load_guide(cfg, module, run_cfg)
    sampler = instantiate_checked(cfg.sampler, "sampler")
    name = sampler_name(cfg.sampler)
    steps = cfg.sampler.get("steps") or module.diffusion.num_timesteps
    out = Path(cfg.out) if cfg.out else default_out(ckpt_path, f"{name}-{steps}-seed{cfg.seed}")
    frames: list | None = [] if cfg.animation else None
    start = time.perf_counter()
    images, labels, nfe = generate(
        module,
        sampler,
        n,
        cfg.seed,
        batch_size,
        device,
        cfg.label,
        frames,
        guide=guide,
        guide_weight=cfg.guide_weight,
    )
    out.mkdir(parents=True, exist_ok=True)
    seconds = time.perf_counter() - start
    shown, nrow = grid_layout(
        len(images),
        module.hparams.num_classes if module.hparams.class_conditional and cfg.label is None else None,
    )
    save_grid(images[:shown], out / "grid.png", nrow=nrow)
    np.savez_compressed(out / "samples.npz", samples=images.numpy(), labels=labels.numpy())
    if frames:
        idx = torch.linspace(0, len(frames) - 1, min(cfg.animation_frames, len(frames))).round().long()
        save_animation([frames[i] for i in idx.tolist()], out / "animation.gif")
    print(
        f"{n} samples ({name}, {nfe} network evaluations each, step {pipe.info.get('global_step')}) in "
        f"{seconds:.1f} s -> {out}"
    )


if __name__ == "__main__":
    main()
