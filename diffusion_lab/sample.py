"""Draw samples from a checkpoint:

    python -m diffusion_lab.sample ckpt=outputs/train/runs/.../checkpoints/last.ckpt n=64 seed=0
    python -m diffusion_lab.sample ckpt=... sampler.steps=50          # the checkpoint's sampler, 50 steps
    python -m diffusion_lab.sample ckpt=... sampler=ddim sampler.steps=50 out=samples/ddim50

draws with the checkpoint's own sampler config (its run's ``sampler``) unless ``sampler=NAME`` chooses one
(:mod:`diffusion_lab.utils.checkpoint_sampler`); the first line says which. It

writes ``grid.png``, ``samples.npz`` (uint8 (N, C, H, W) ``samples`` and int64 ``labels``) and, with
``animation=true``, ``animation.gif`` of the reverse process.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion_lab.samplers import resolve_steps
from diffusion_lab.samplers import sample as run_sampler
from diffusion_lab.samplers.guidance import AutoGuidance, check_guide
from diffusion_lab.training.checkpoint import load_module
from diffusion_lab.utils.checkpoint_sampler import SamplerChoice, choose_sampler, sampler_args, sampler_name
from diffusion_lab.utils.cli import exit_on_bad_input
from diffusion_lab.utils.media import save_animation, save_grid, to_uint8
from diffusion_lab.utils.progress import track

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

__all__ = [
    "generate",
    "resolve_device",
    "require_checkpoint",
    "check_count",
    "check_sampler",
    "load_guide",
    "use_checkpoint_sampler",
    "main",
]


def resolve_device(name: str) -> torch.device:
    """``auto`` (cuda when available), ``cpu``, ``cuda``, ``cuda:1``, ...; ValueError for a missing device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA device is available here: use device=cpu (or auto)")
    return device


@torch.no_grad()
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

    ``sampler`` carries every sampling option, classifier-free guidance (``guidance_scale``) included: the
    ``sampler`` config is the one place they are set. ``guide`` (a module, see :func:`load_guide`) adds
    autoguidance with weight ``guide_weight`` (:class:`~diffusion_lab.samplers.guidance.AutoGuidance`; each
    network evaluation then runs both networks and counts once).
    """
    device = torch.device(device)
    module = module.to(device).eval()
    model_fn = module.model
    if guide is not None:
        model_fn = AutoGuidance(module.model, guide.to(device).eval().model, guide_weight)
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
            model_fn,
            module.diffusion,
            (b, *module.image_shape),
            sampler=sampler,
            seed=seed + i,
            device=device,
            return_nfe=True,
            y=y,
            callback=callback,
        )
        outs.append(to_uint8(x.cpu(), value_range=(-1, 1)))
        labels.append(y.cpu() if y is not None else torch.full((b,), -1))
        nfe = k
    return torch.cat(outs), torch.cat(labels), nfe


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
    steps, grid = cfg.sampler.get("steps"), cfg.sampler.get("grid") or "uniform"
    if steps is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                resolve_steps(module.diffusion, steps, grid, cfg.sampler.get("grid_opts"))
        except (ValueError, TypeError) as e:
            if str(e).startswith("unknown grid"):
                key, value = "sampler.grid", grid
            elif isinstance(e, TypeError):  # an option the grid does not take
                key, value = "sampler.grid_opts", dict(cfg.sampler.get("grid_opts") or {})
            else:
                key, value = "sampler.steps", steps
            raise ValueError(f"{key}={value!r} is not valid: {e}") from None
    label = cfg.get("label")
    if label is not None:
        k = int(module.hparams.num_classes)
        if not module.hparams.class_conditional:
            raise ValueError(f"label={label!r}: this checkpoint's model is unconditional; leave label=null")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < k:
            raise ValueError(f"label={label!r} is not valid: give a class in [0, {k - 1}] or null")


def load_guide(cfg: DictConfig, module, run_cfg: DictConfig):
    """The guiding module of ``guidance=auto guide_ckpt=PATH`` (None without guidance), checked against the
    model (same data, image shape, classes, diffusion and parameterization); one-line ValueErrors."""
    mode = cfg.get("guidance")
    if mode in (None, "none", False):
        if cfg.get("guide_ckpt"):
            raise ValueError(f"guide_ckpt={cfg.guide_ckpt} is set but guidance is not: add guidance=auto")
        return None
    if mode != "auto":
        raise ValueError(
            f"guidance={mode!r} is not valid: use guidance=auto (autoguidance) or null; classifier-free "
            "guidance is sampler.guidance_scale"
        )
    if not cfg.get("guide_ckpt"):
        raise ValueError(
            "guidance=auto needs the guiding model: add guide_ckpt=PATH (a smaller or less-trained run)"
        )
    weight = cfg.get("guide_weight")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"guide_weight={weight!r} is not valid: give a number, e.g. 2.0 (1 = no guidance)")
    guide, guide_cfg, _ = load_module(cfg.guide_ckpt, ema=cfg.get("guide_ema", True))
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
        str(cfg.get("sampler_fallback") or "ddpm"),
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
    # `sampler.steps=50` without `sampler=NAME` changes the checkpoint's sampler: Hydra needs `++` for it.
    sys.argv = sampler_args(sys.argv)
    _sample_main()


def _sample(cfg: DictConfig) -> None:
    ckpt_path = require_checkpoint(cfg)
    n, batch_size = check_count(cfg, "n"), check_count(cfg, "batch_size")
    device = resolve_device(cfg.device)
    module, run_cfg, ckpt = load_module(ckpt_path, ema=cfg.ema)
    use_checkpoint_sampler(cfg, run_cfg, ckpt_path)
    check_sampler(cfg, module)
    guide = load_guide(cfg, module, run_cfg)
    sampler = instantiate(cfg.sampler)
    name = sampler_name(cfg.sampler)
    steps = cfg.sampler.get("steps") or module.diffusion.num_timesteps
    out = (
        Path(cfg.out)
        if cfg.out
        else Path(ckpt_path).resolve().parents[1] / "samples" / f"{name}-{steps}-seed{cfg.seed}"
    )
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
        guide_weight=cfg.get("guide_weight", 1.0),
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
        f"{n} samples ({name}, {nfe} network evaluations each, step {ckpt.get('global_step')}) in "
        f"{seconds:.1f} s -> {out}"
    )


if __name__ == "__main__":
    main()
