"""An ``experiment=cifar10_ddpm``-shaped run through the real entry point (``diffusion_lab.train.train``, the
Lightning Trainer of ``trainer=gpu``) on the bundled digits as 3x32x32 images: the loss falls, stays finite,
and the last checkpoint round-trips through ``load_module`` (same weights, samples drawn from it).

Changed from the experiment: the dataset (nothing to download), ``lr_scheduler.warmup_steps=50`` (DDPM's 5000
warm-up steps would keep the lr near zero for the whole short run), no validation, no sample grid, no FID
(each would compile the backbone once more in eval mode), csv logging.
"""

from __future__ import annotations

import csv
import math
import time

import torch

from experiments.gpu_check.common import Ctx, Record, compose_run_config, first_line

__all__ = ["run_training", "training_overrides", "read_log"]


def training_overrides(ctx: Ctx, steps: int) -> list[str]:
    return [
        f"trainer.max_steps={steps}",
        "trainer.limit_val_batches=0",
        f"trainer.log_every_n_steps={2 if ctx.tiny else 5}",
        "lr_scheduler.warmup_steps=50",
        "callbacks.sample_grid=null",
        "callbacks.best_checkpoint=null",
        f"callbacks.model_checkpoint.every_n_train_steps={steps}",
    ] + (["optimizer.lr=1e-3"] if ctx.tiny else [])


def read_log(run_dir, key: str) -> list[tuple[int, float]]:
    """(step, value) rows of ``key`` (e.g. "train/loss") in the run's CSV log."""
    files = sorted(run_dir.rglob("metrics.csv"))
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {run_dir}")
    with files[0].open() as f:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(f) if row.get(key)]


def run_training(ctx: Ctx, rec: Record) -> None:
    from diffusion_lab.samplers import sample
    from diffusion_lab.train import train
    from diffusion_lab.training.checkpoint import load_module, read_checkpoint

    steps = 24 if ctx.tiny else 400
    run_dir = ctx.work / "training"
    overrides = ctx.base_overrides() + ctx.model_overrides("unet_cifar") + training_overrides(ctx, steps)
    cfg = compose_run_config(ctx, overrides, run_dir)
    rec.update(overrides=overrides, steps=steps, model=cfg.model._target_, compile=bool(cfg.compile))
    rec.update(precision=str(cfg.trainer.precision), channels_last=bool(cfg.channels_last))
    start = time.perf_counter()
    try:
        result = train(cfg)
    except Exception as e:
        if not cfg.compile:
            raise
        # a compile failure must not hide the rest: record it, then check the rest without compile
        rec["compile_error"] = first_line(e)
        rec.check("trained with compile=true", False, rec["compile_error"])
        print(f"  compile=true failed ({rec['compile_error']}); again with compile=false", flush=True)
        run_dir = ctx.work / "training_eager"
        cfg = compose_run_config(ctx, overrides + ["compile=false"], run_dir)
        start = time.perf_counter()
        result = train(cfg)
    rec["train_seconds"] = round(time.perf_counter() - start, 1)
    rec["global_step"] = result["global_step"]
    rec["parameters"] = result["num_parameters"]
    rec.check("all steps ran", result["global_step"] == steps, result["global_step"])

    # Lightning's ThroughputMonitor (conf/callbacks): images/s with the loader's host-to-device copy
    ips = read_log(run_dir / "run", "train/device/samples_per_sec")
    rec["lightning_images_per_s_last"] = round(ips[-1][1], 1) if ips else None
    losses = read_log(run_dir / "run", "train/loss")
    values = [v for _, v in losses]
    k = max(1, len(values) // 5)
    first, last = sum(values[:k]) / k, sum(values[-k:]) / k
    rec["loss_first_fifth"], rec["loss_last_fifth"] = round(first, 4), round(last, 4)
    rec["loss_curve"] = [[s, round(v, 4)] for s, v in losses]
    rec.check("loss finite", all(math.isfinite(v) for v in values))
    factor = 0.9 if ctx.tiny else 0.5  # toy: a 16-channel net for 24 steps; full: 400 steps fall by far more
    rec.check(f"loss falls (last fifth < {factor} x first fifth)", last < factor * first, [first, last])

    # checkpoint round trip: the module rebuilt from the checkpoint alone holds its weights (EMA and raw)
    path = result["last_checkpoint"]
    rec["checkpoint"] = str(path)
    ckpt = read_checkpoint(path)
    for ema, key in ((True, "state_dict"), (False, "current_model_state")):
        module, _, _ = load_module(path, map_location="cpu", ema=ema)
        saved = ckpt.get(key, ckpt["state_dict"])
        loaded = module.state_dict()
        same = set(saved) == set(loaded) and all(torch.equal(saved[n].cpu(), loaded[n]) for n in saved)
        rec.check(f"checkpoint round-trip ({key})", same)
    module, _, _ = load_module(path, map_location=ctx.device, ema=True)
    module.eval()
    n = 4 if ctx.tiny else 16
    # fp32: on the H200 (torch 2.11), bf16 autocast around this sampling call, in the process that had just
    # run the compiled bf16 fit, failed at the U-Net's input conv with "Input type (c10::BFloat16) and bias
    # type (float)" (gpu_check/results.md); bf16 sampling in a fresh process (the sampling section,
    # and the sample / evaluate commands) ran. The round trip checks weights, so it samples in fp32.
    with torch.no_grad():
        x = sample(
            module.model,
            module.diffusion,
            (n, 3, ctx.image_size, ctx.image_size),
            sampler="dpm_solver",
            steps=20,
            device=ctx.device,
        )
    x = x.float()
    rec["sample_range"] = [round(x.min().item(), 3), round(x.max().item(), 3)]
    rec.check(
        "samples finite and in [-1, 1]", bool(torch.isfinite(x).all()) and x.abs().max().item() <= 1.0001
    )
    # the trained net denoises the data better than chance: its loss on a data batch is near the last losses
    from diffusion_lab.data import DiffusionDataModule

    dm = DiffusionDataModule(
        name="digits", image_size=ctx.image_size, channels=3, batch_size=64, cache_dir=ctx.work / "cache"
    )
    dm.prepare_data()
    real = dm.real_images("train", n=64)[0].to(ctx.device).float() / 127.5 - 1
    g = torch.Generator(device=ctx.device).manual_seed(0)
    t = module.diffusion.sample_timesteps(real.shape[0], device=ctx.device, generator=g)
    eps = torch.randn(real.shape, generator=g, device=ctx.device)
    with torch.no_grad():
        reloaded_loss = (
            module.diffusion.training_losses(module.model, real, t=t, eps=eps)["loss"].mean().item()
        )
    rec["reloaded_model_loss"] = round(reloaded_loss, 4)
    rec.check("reloaded model's loss below the first losses", reloaded_loss < first, [reloaded_loss, first])
