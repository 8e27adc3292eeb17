"""``trainer=ddp`` through ``train()`` on every visible GPU (one process per GPU, NCCL; one GPU is still a
one-process DDP run); under ``--device cpu`` ``trainer=ddp_cpu``: two gloo processes. Lightning starts the
other ranks by running this same command again, so this section always runs in its own process.

``compile=false`` here: the compiled backbone inside DDP is split by TorchDynamo's DDPOptimizer at the
gradient buckets, a different graph from the single-device one, so it would be compiled anew.
"""

from __future__ import annotations

import time

import torch

from experiments.gpu_check.common import Ctx, Record, compose_run_config

__all__ = ["run_ddp"]


def run_ddp(ctx: Ctx, rec: Record) -> None:
    from diffusion_lab.train import train
    from diffusion_lab.training.checkpoint import read_checkpoint

    steps = 4 if ctx.tiny else 30
    trainer = ["trainer=ddp"] if ctx.cuda else ["trainer=ddp_cpu", "trainer.devices=2"]
    name = "ddp"
    overrides = (
        ctx.base_overrides()
        + ctx.model_overrides("unet_cifar")
        + trainer
        + [
            "compile=false",
            f"trainer.max_steps={steps}",
            "trainer.limit_val_batches=0",
            "trainer.log_every_n_steps=2",
            "callbacks.sample_grid=null",
            "callbacks.best_checkpoint=null",
            f"callbacks.model_checkpoint.every_n_train_steps={steps}",
        ]
    )
    overrides = [o for o in overrides if o != "trainer.accelerator=cpu"]  # ddp_cpu says so itself
    cfg = compose_run_config(ctx, overrides, ctx.work / name)
    rec.update(overrides=overrides, steps=steps, visible_gpus=torch.cuda.device_count() if ctx.cuda else 0)
    rec["strategy"] = str(
        cfg.trainer.strategy if isinstance(cfg.trainer.strategy, str) else cfg.trainer.strategy._target_
    )
    start = time.perf_counter()
    result = train(cfg)
    rec["seconds"] = round(time.perf_counter() - start, 1)
    rec["global_step"] = result["global_step"]
    rec.check("all steps ran", result["global_step"] == steps, result["global_step"])
    ckpt = read_checkpoint(result["last_checkpoint"])
    world = ckpt["DiffusionDataModule"]["train_batches"]["world_size"]
    rec["world_size"] = world
    expected = max(1, torch.cuda.device_count()) if ctx.cuda else 2
    rec.check(f"world size = {expected} processes", world == expected, world)
    loss = result["metrics"].get("train/loss")
    rec["last_loss"] = loss
    rec.check("loss finite", loss is not None and loss == loss and abs(loss) < float("inf"))
